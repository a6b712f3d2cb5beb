-- Erasures that scan nothing, registrations that an erasure cannot slip between, and no claim written in clear.

-- An erasure deletes its person's claims inside a transaction that holds an xid, and so holds back the horizon of
-- every reader of the log: by this index, never by a scan of every claim.
CREATE INDEX claims_owner_idx ON claims (owner_id);

-- An erasure deletes the idempotency records that tie its person's subject (a keyed hash) to their user id, found
-- by the user id every stored answer names.
CREATE INDEX idempotency_records_user_idx ON idempotency_records ((outcome ->> 'user_id'));

-- Claims of identities (`auth0_subject`, `github_id`) hold keyed hashes (`h1~…`), never the identity. A command
-- service from before keyed hashes, still running during a rolling upgrade, would write its claims in clear, and a
-- new service (which looks for the hash) would then register the same identity a second time: such an insert is
-- refused instead. Creating the trigger waits for inserts in flight, so the new service's start-up pass over
-- clear claims (after its migrations) sees every one of them.
CREATE FUNCTION kiroku_refuse_clear_claim() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'KR422',
        MESSAGE = 'claims hold keyed hashes: this claim is in clear (a kiroku-command from before keyed hashes?)';
END
$$;
CREATE TRIGGER claims_hashed BEFORE INSERT ON claims
    FOR EACH ROW WHEN (NEW.kind IN ('auth0_subject', 'github_id') AND left(NEW.value, 3) <> 'h1~')
    EXECUTE FUNCTION kiroku_refuse_clear_claim();

-- The append, as before, but for its claims: an erasure that commits between the claims' insert (which found a
-- claim held, and so inserted nothing) and the look-up of who holds it (which then finds nobody) used to leave the
-- registration without that claim, free for a second user to take. The claims are now tried again until each is
-- held by this aggregate or by another (a refusal); a claim held by this aggregate already counts as taken.
CREATE OR REPLACE FUNCTION kiroku_append(
    p_aggregate_id uuid,
    p_aggregate_type varchar,
    p_expected integer,
    p_ids varchar[],
    p_types varchar[],
    p_data jsonb[],
    p_metadata jsonb[],
    p_occurred timestamptz[],
    p_claim_kinds varchar[],
    p_claim_values varchar[],
    p_caller varchar,
    p_request_id varchar,
    p_outcome jsonb,
    p_key_master_id varchar,
    p_key_wrapped bytea
) RETURNS TABLE (replayed boolean, version integer, event_position bigint, outcome jsonb, aggregate_id uuid)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    refused record;
    missing integer;
    tries integer := 0;
    found_version integer;
    written integer;
BEGIN
    IF p_caller IS NOT NULL THEN
        INSERT INTO idempotency_records (caller, request_id, outcome, aggregate_id, version, position)
        VALUES (p_caller, p_request_id, p_outcome, p_aggregate_id, 0, 0)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN QUERY SELECT true, i.version, i.position, i.outcome, i.aggregate_id
                FROM idempotency_records i WHERE i.caller = p_caller AND i.request_id = p_request_id;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'KR500', MESSAGE = 'idempotency record not found after a key conflict';
            END IF;
            RETURN;
        END IF;
    END IF;

    IF cardinality(p_claim_kinds) > 0 THEN
        LOOP
            tries := tries + 1;
            INSERT INTO claims (kind, value, owner_id)
            SELECT w.kind, w.value, p_aggregate_id
            FROM (SELECT DISTINCT c.kind, c.value FROM unnest(p_claim_kinds, p_claim_values) AS c(kind, value)) w
            ORDER BY w.kind COLLATE "C", w.value COLLATE "C"
            ON CONFLICT DO NOTHING;
            -- Each statement takes a fresh snapshot: who holds each claim now, this aggregate included.
            SELECT c.kind, c.value, o.owner_id INTO refused
            FROM unnest(p_claim_kinds, p_claim_values) AS c(kind, value)
            JOIN claims o ON o.kind = c.kind AND o.value = c.value
            WHERE o.owner_id <> p_aggregate_id
            ORDER BY c.kind COLLATE "C", c.value COLLATE "C"
            LIMIT 1;
            IF FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'KR409', MESSAGE = 'claim taken',
                    DETAIL = refused.kind || E'\n' || refused.value || E'\n' || refused.owner_id;
            END IF;
            SELECT count(*) INTO missing
            FROM unnest(p_claim_kinds, p_claim_values) AS c(kind, value)
            WHERE NOT EXISTS (SELECT 1 FROM claims o WHERE o.kind = c.kind AND o.value = c.value);
            EXIT WHEN missing = 0;
            IF tries >= 10 THEN
                RAISE EXCEPTION USING ERRCODE = '40001',
                    MESSAGE = 'claims were released and taken again while this append claimed them; retry';
            END IF;
        END LOOP;
    END IF;

    IF p_key_wrapped IS NOT NULL THEN
        INSERT INTO data_keys (owner_id, master_key_id, wrapped) VALUES (p_aggregate_id, p_key_master_id, p_key_wrapped);
    END IF;

    SELECT coalesce(max(e.event_version), 0) INTO found_version FROM events e WHERE e.aggregate_id = p_aggregate_id;
    IF p_expected IS NOT NULL AND found_version <> p_expected THEN
        RAISE EXCEPTION USING ERRCODE = 'KR412', MESSAGE = 'version conflict', DETAIL = found_version::text;
    END IF;
    RETURN QUERY
    INSERT INTO events (id, aggregate_id, aggregate_type, event_type, event_version, event_data, metadata,
                        occurred_at, position)
    SELECT n.id, p_aggregate_id, p_aggregate_type, n.event_type, found_version + n.ord::integer, n.data,
           n.metadata, n.occurred_at, (pg_current_xact_id()::text::bigint << 16) + (n.ord - 1)
    FROM unnest(p_ids, p_types, p_data, p_metadata, p_occurred)
         WITH ORDINALITY AS n(id, event_type, data, metadata, occurred_at, ord)
    ORDER BY n.ord
    RETURNING false, events.event_version, events.position, NULL::jsonb, events.aggregate_id;
    GET DIAGNOSTICS written = ROW_COUNT;

    IF p_caller IS NOT NULL THEN
        UPDATE idempotency_records i
        SET version = found_version + written,
            position = (pg_current_xact_id()::text::bigint << 16) + (written - 1)
        WHERE i.caller = p_caller AND i.request_id = p_request_id;
    END IF;
END
$$;
