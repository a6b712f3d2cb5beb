-- Failures are per generation (a rebuild's attempts do not count against the live generation's), and an
-- aggregate whose event was dead-lettered is parked: its later events wait with it (state 'parked') instead of
-- each failing every attempt for want of its predecessor.
ALTER TABLE projection_failures
    ADD COLUMN generation   integer,
    ADD COLUMN aggregate_id uuid,
    ADD COLUMN state        varchar(10) NOT NULL DEFAULT 'failing';

UPDATE projection_failures f SET generation = p.active_generation FROM projections p WHERE p.name = f.projection;
UPDATE projection_failures f SET aggregate_id = e.aggregate_id FROM events e WHERE e.position = f.position;
UPDATE projection_failures SET state = 'dead' WHERE dead_lettered;

ALTER TABLE projection_failures
    DROP CONSTRAINT projection_failures_pkey,
    DROP COLUMN dead_lettered,
    ALTER COLUMN generation SET NOT NULL,
    ALTER COLUMN aggregate_id SET NOT NULL,
    ADD CONSTRAINT projection_failures_pkey PRIMARY KEY (projection, generation, position),
    ADD CONSTRAINT projection_failures_state CHECK (state IN ('failing', 'dead', 'parked'));

-- Each step reads the parked aggregates of its generation (usually none).
CREATE INDEX projection_failures_parked_idx ON projection_failures (projection, generation, aggregate_id)
    WHERE state <> 'failing';

-- Where the projection's events came from: the Redis stream (the normal path) or the event store (a gap in the
-- stream, Redis away). Counted with each step, so that `kiroku projector status` shows a projection that has
-- quietly stopped consuming Redis.
ALTER TABLE projection_checkpoints
    ADD COLUMN from_stream bigint NOT NULL DEFAULT 0,
    ADD COLUMN from_store  bigint NOT NULL DEFAULT 0;

-- ListUsers pages in registration order, which is log order: the position of the user's UserRegistered.
ALTER TABLE users_read_rows ADD COLUMN registered_position bigint;
UPDATE users_read_rows u SET registered_position = e.position
FROM events e WHERE e.aggregate_id = u.id AND e.event_version = 1;
UPDATE users_read_rows SET registered_position = position WHERE registered_position IS NULL;
ALTER TABLE users_read_rows ALTER COLUMN registered_position SET NOT NULL;
CREATE INDEX users_read_rows_registered_idx ON users_read_rows (generation, registered_position);

CREATE OR REPLACE VIEW users_read AS
SELECT u.id, u.auth0_id, u.github_id, u.github_username, u.display_name, u.avatar_url, u.status,
       u.created_at, u.updated_at, u.version, u.position, u.registered_position
FROM users_read_rows u
JOIN projections p ON p.name = 'users' AND u.generation = p.active_generation;
