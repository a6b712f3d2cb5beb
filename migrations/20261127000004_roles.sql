-- Least privilege: one NOLOGIN role per service, granted only what that service does. Deployments create login
-- users that are members of these roles (compose does); the owner of the schema only migrates
-- (KIROKU_MIGRATE_DATABASE_URL, or `kiroku migrate`). Roles belong to the cluster, not the database: they are
-- created once, whichever database migrates first, and concurrent migrations may race to create them.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['kiroku_command', 'kiroku_query', 'kiroku_projector'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', name);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA public TO kiroku_command, kiroku_query, kiroku_projector;

-- The command service appends to the log (with its claims and idempotency records), reads aggregates back, and
-- runs the relay (its checkpoint). It never touches a read model.
GRANT SELECT, INSERT ON events TO kiroku_command;
GRANT SELECT, INSERT, DELETE ON claims TO kiroku_command;
GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_records TO kiroku_command;
GRANT SELECT, INSERT, UPDATE ON checkpoints TO kiroku_command;

-- The query service reads: the log (history, WatchEvents) and the read models.
GRANT SELECT ON events, users_read, registration_failures_read, projections, projection_checkpoints
    TO kiroku_query;

-- The projector reads the log and writes the read models, its checkpoints and its failures.
GRANT SELECT ON events, users_read, registration_failures_read TO kiroku_projector;
GRANT SELECT, UPDATE ON projections TO kiroku_projector;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON users_read_rows, registration_failures_rows, projection_checkpoints, projection_failures
    TO kiroku_projector;
