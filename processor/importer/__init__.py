"""`cancelproc import`: bring clients, products, services, add-ons, invoices and requests
in from the billing system (CSV with a header row, or JSON Lines), keyed by its own ids.

Each file is one transaction: every row is validated first (all errors are collected and
reported with file, line and field) and nothing of the file is written if any row is bad.
Good files are upserted by ``external_id``: new rows inserted, existing rows updated only
where a value differs, so a nightly re-import of an unchanged export writes nothing.

The importer never undoes the processor's work: a row that would reopen a service, add-on
or invoice cancelled by a completed request, or change a request that is no longer pending,
is skipped and reported as a conflict while the rest of the file is applied.

The stages, each depending only on the ones before it: `read` (the file's rows), `validate`
(the row models), `plan` (per row: insert, update, unchanged, conflict or error), `write`
(the SQL, inside the caller's transaction); `importer` runs them for one file
(`import_file`), or for rows a caller maps itself, in the caller's transaction (`validate`,
then `apply`: the WHMCS import, processor/whmcs_import.py).
"""

from processor.importer.importer import Batch, FileReport, ImportRejected, apply, import_file, validate
from processor.importer.read import ParsedFile, read_file
from processor.importer.validate import KINDS, RowError, infer_kind

__all__ = ["KINDS", "Batch", "FileReport", "ImportRejected", "ParsedFile", "RowError", "apply", "import_file",
           "infer_kind", "read_file", "validate"]
