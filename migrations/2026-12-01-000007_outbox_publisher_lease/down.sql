DROP TABLE outbox_publisher;
