DROP TABLE user_event_stats;
DROP TABLE outbox;
DROP TABLE events;
