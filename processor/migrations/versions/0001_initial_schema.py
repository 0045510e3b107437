"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 05:59:55.246729
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('clients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('external_id', sa.String(length=64), nullable=True),
    sa.Column('first_name', sa.String(length=100), nullable=False),
    sa.Column('last_name', sa.String(length=100), nullable=False),
    sa.Column('company_name', sa.String(length=200), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=False),
    sa.Column('language', sa.String(length=16), nullable=False),
    sa.Column('balance', sa.Numeric(precision=12, scale=2), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_clients')),
    sa.UniqueConstraint('external_id', name=op.f('uq_clients_external_id'))
    )
    op.create_table('products',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('external_id', sa.String(length=64), nullable=True),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('module', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_products')),
    sa.UniqueConstraint('external_id', name=op.f('uq_products_external_id'))
    )
    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('trigger', sa.Enum('cron', 'schedule', 'manual', name='run_trigger', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('operator', sa.String(length=100), nullable=False),
    sa.Column('as_of', sa.Date(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('running', 'completed', 'completed_with_failures', 'error', 'abandoned', name='run_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('due', sa.Integer(), nullable=False),
    sa.Column('completed', sa.Integer(), nullable=False),
    sa.Column('noop', sa.Integer(), nullable=False),
    sa.Column('retrying', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('vetoed', sa.Integer(), nullable=False),
    sa.Column('emails_queued', sa.Integer(), nullable=False),
    sa.Column('late', sa.Integer(), nullable=False),
    sa.Column('max_days_late', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    op.create_table('leases',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('process_started_at', sa.DateTime(), nullable=True),
    sa.Column('acquired_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_leases_run_id_runs')),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_leases'))
    )
    op.create_table('services',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('external_id', sa.String(length=64), nullable=True),
    sa.Column('client_id', sa.Integer(), nullable=False),
    sa.Column('product_id', sa.Integer(), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('status', sa.Enum('Pending', 'Active', 'Suspended', 'Terminated', 'Cancelled', 'Fraud', name='service_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('billing_cycle', sa.String(length=32), nullable=False),
    sa.Column('amount', sa.Numeric(precision=12, scale=2), nullable=False),
    sa.Column('next_due_date', sa.Date(), nullable=True),
    sa.Column('termination_date', sa.Date(), nullable=True),
    sa.ForeignKeyConstraint(['client_id'], ['clients.id'], name=op.f('fk_services_client_id_clients')),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_services_product_id_products')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_services')),
    sa.UniqueConstraint('external_id', name=op.f('uq_services_external_id'))
    )
    with op.batch_alter_table('services', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_services_client_id'), ['client_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_services_product_id'), ['product_id'], unique=False)

    op.create_table('cancellation_requests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('external_id', sa.String(length=64), nullable=True),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('type', sa.Enum('Immediate', 'End of Billing Period', 'On Date', name='request_type', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('cancel_on', sa.Date(), nullable=True),
    sa.Column('reason_code', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'completed', 'withdrawn', 'failed', name='request_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('created_by', sa.String(length=100), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=True),
    sa.Column('processed_at', sa.DateTime(), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('days_late', sa.Integer(), nullable=True),
    sa.Column('note', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_cancellation_requests_run_id_runs')),
    sa.ForeignKeyConstraint(['service_id'], ['services.id'], name=op.f('fk_cancellation_requests_service_id_services')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cancellation_requests')),
    sa.UniqueConstraint('external_id', name=op.f('uq_cancellation_requests_external_id'))
    )
    with op.batch_alter_table('cancellation_requests', schema=None) as batch_op:
        batch_op.create_index('ix_cancellation_requests_status_id', ['status', 'id'], unique=False)
        batch_op.create_index('uq_cancellation_requests_open_service', ['service_id'], unique=True, sqlite_where=sa.text("status IN ('pending', 'failed')"), postgresql_where=sa.text("status IN ('pending', 'failed')"))

    op.create_table('invoices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('external_id', sa.String(length=64), nullable=True),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.Numeric(precision=12, scale=2), nullable=False),
    sa.Column('status', sa.Enum('Unpaid', 'Paid', 'Cancelled', name='invoice_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('due_date', sa.Date(), nullable=True),
    sa.ForeignKeyConstraint(['service_id'], ['services.id'], name=op.f('fk_invoices_service_id_services')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invoices')),
    sa.UniqueConstraint('external_id', name=op.f('uq_invoices_external_id'))
    )
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_invoices_service_id'), ['service_id'], unique=False)

    op.create_table('service_addons',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('external_id', sa.String(length=64), nullable=True),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('status', sa.Enum('Pending', 'Active', 'Suspended', 'Terminated', 'Cancelled', 'Fraud', name='addon_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('amount', sa.Numeric(precision=12, scale=2), nullable=False),
    sa.ForeignKeyConstraint(['service_id'], ['services.id'], name=op.f('fk_service_addons_service_id_services')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_service_addons')),
    sa.UniqueConstraint('external_id', name=op.f('uq_service_addons_external_id'))
    )
    with op.batch_alter_table('service_addons', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_service_addons_service_id'), ['service_id'], unique=False)

    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('request_id', sa.Integer(), nullable=True),
    sa.Column('entity', sa.String(length=32), nullable=False),
    sa.Column('entity_id', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['request_id'], ['cancellation_requests.id'], name=op.f('fk_audit_log_request_id_cancellation_requests')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_audit_log_run_id_runs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index('ix_audit_log_entity', ['entity', 'entity_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_request_id'), ['request_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_run_id'), ['run_id'], unique=False)

    op.create_table('email_outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('template', sa.String(length=100), nullable=False),
    sa.Column('request_id', sa.Integer(), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('to_address', sa.String(length=254), nullable=False),
    sa.Column('from_address', sa.String(length=254), nullable=False),
    sa.Column('subject', sa.String(length=998), nullable=False),
    sa.Column('text_body', sa.Text(), nullable=False),
    sa.Column('html_body', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('queued', 'sent', 'failed', name='email_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['request_id'], ['cancellation_requests.id'], name=op.f('fk_email_outbox_request_id_cancellation_requests')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_email_outbox_run_id_runs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_email_outbox')),
    sa.UniqueConstraint('key', name=op.f('uq_email_outbox_key'))
    )
    with op.batch_alter_table('email_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_email_outbox_request_id'), ['request_id'], unique=False)
        batch_op.create_index('ix_email_outbox_status_id', ['status', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('email_outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_email_outbox_status_id')
        batch_op.drop_index(batch_op.f('ix_email_outbox_request_id'))

    op.drop_table('email_outbox')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_run_id'))
        batch_op.drop_index(batch_op.f('ix_audit_log_request_id'))
        batch_op.drop_index('ix_audit_log_entity')

    op.drop_table('audit_log')
    with op.batch_alter_table('service_addons', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_service_addons_service_id'))

    op.drop_table('service_addons')
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_invoices_service_id'))

    op.drop_table('invoices')
    with op.batch_alter_table('cancellation_requests', schema=None) as batch_op:
        batch_op.drop_index('uq_cancellation_requests_open_service', sqlite_where=sa.text("status IN ('pending', 'failed')"), postgresql_where=sa.text("status IN ('pending', 'failed')"))
        batch_op.drop_index('ix_cancellation_requests_status_id')

    op.drop_table('cancellation_requests')
    with op.batch_alter_table('services', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_services_product_id'))
        batch_op.drop_index(batch_op.f('ix_services_client_id'))

    op.drop_table('services')
    op.drop_table('leases')
    op.drop_table('runs')
    op.drop_table('products')
    op.drop_table('clients')
