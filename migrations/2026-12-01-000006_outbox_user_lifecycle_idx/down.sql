DROP INDEX outbox_user_lifecycle_idx;
