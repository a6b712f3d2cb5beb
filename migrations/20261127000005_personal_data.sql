-- Personal data: every person's fields are sealed in the log under a data key of their own (AES-256-GCM), stored
-- here wrapped by the master key (KIROKU_MASTER_KEY, named by `master_key_id` so that it can rotate). Erasing a
-- person destroys their key in the transaction that appends UserErased: the row stays as a tombstone (no key,
-- `destroyed_at` set), so that no later write can give an erased person a fresh key. The row owned by the nil
-- UUID holds the key of the keyed hashes that claims and idempotency keys store instead of identities.
CREATE TABLE data_keys (
    owner_id      uuid         NOT NULL,
    master_key_id varchar(64),
    wrapped       bytea,
    created_at    timestamptz  NOT NULL DEFAULT now(),
    destroyed_at  timestamptz,
    CONSTRAINT data_keys_pkey PRIMARY KEY (owner_id),
    CONSTRAINT data_keys_destroyed CHECK ((wrapped IS NULL) = (destroyed_at IS NOT NULL)
                                         AND (wrapped IS NULL) = (master_key_id IS NULL))
);

-- An erasure finds the refused attempts that name the person (their audit events) by this index.
CREATE INDEX events_audit_duplicate_user_idx ON events ((event_data ->> 'duplicate_user_id'))
    WHERE aggregate_type = 'UserRegistrationAudit';

-- Read models: an erased user keeps their row (status 'erased') without personal fields; their refused
-- attempts keep theirs without identities.
ALTER TABLE users_read_rows
    ALTER COLUMN auth0_id DROP NOT NULL,
    ALTER COLUMN github_id DROP NOT NULL,
    ALTER COLUMN github_username DROP NOT NULL,
    ALTER COLUMN display_name DROP NOT NULL;
ALTER TABLE registration_failures_rows
    ALTER COLUMN auth0_id DROP NOT NULL,
    ALTER COLUMN github_id DROP NOT NULL;
CREATE INDEX registration_failures_rows_duplicate_idx ON registration_failures_rows (generation, duplicate_user_id);
CREATE INDEX users_read_rows_status_idx ON users_read_rows (generation, status, registered_position);

-- An erasure redacts the personal fields of events written before encryption: the one mutation the log allows.
-- Nobody may UPDATE events; this function (running as the schema owner) is the only way, and it can only take
-- members away: the new payload, less its `erased` marker, must be contained in the old one, and carry the marker.
CREATE FUNCTION kiroku_redact_events(positions bigint[], payloads jsonb[]) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    redacted integer;
BEGIN
    IF EXISTS (
        SELECT 1 FROM unnest(positions, payloads) AS r(position, payload)
        JOIN events e ON e.position = r.position
        WHERE NOT ((r.payload - 'erased') <@ e.event_data AND r.payload -> 'erased' = 'true'::jsonb)
    ) THEN
        RAISE EXCEPTION 'a redaction may only remove members of an event''s payload';
    END IF;
    UPDATE events e SET event_data = r.payload
    FROM unnest(positions, payloads) AS r(position, payload)
    WHERE e.position = r.position;
    GET DIAGNOSTICS redacted = ROW_COUNT;
    RETURN redacted;
END
$$;
REVOKE ALL ON FUNCTION kiroku_redact_events(bigint[], jsonb[]) FROM PUBLIC;

-- The command service creates keys and destroys them, and redacts through the function above. The query service
-- and the projector open sealed fields, so they read keys.
GRANT SELECT, INSERT, UPDATE ON data_keys TO kiroku_command;
GRANT EXECUTE ON FUNCTION kiroku_redact_events(bigint[], jsonb[]) TO kiroku_command;
GRANT SELECT ON data_keys TO kiroku_query, kiroku_projector;
