-- kiroku_append becomes the one way to append (the event store's statements and its Rust copy of these steps are
-- gone): an append with nothing but events calls it too, and so does an erasure, inside the transaction that then
-- erases. So it takes over what the plain insert of a new stream did: it does not read a new stream's version
-- (that read cost ~15 % of a one-event append's server time). Otherwise as migration 13 restated it.
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
            -- Each statement takes a fresh snapshot: who holds each claim now, this aggregate included. One look
            -- for both questions: a claim another holds comes first (a refusal), then one nobody holds (released
            -- meanwhile: insert again); none of either, and every claim is this aggregate's.
            SELECT c.kind, c.value, o.owner_id INTO refused
            FROM unnest(p_claim_kinds, p_claim_values) AS c(kind, value)
            LEFT JOIN LATERAL (SELECT h.owner_id FROM claims h WHERE h.kind = c.kind AND h.value = c.value LIMIT 1) o
                ON true
            WHERE o.owner_id IS DISTINCT FROM p_aggregate_id
            ORDER BY o.owner_id IS NULL, c.kind COLLATE "C", c.value COLLATE "C"
            LIMIT 1;
            EXIT WHEN NOT FOUND;
            IF refused.owner_id IS NOT NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'KR409', MESSAGE = 'claim taken',
                    DETAIL = refused.kind || E'\n' || refused.value || E'\n' || refused.owner_id;
            END IF;
            IF tries >= 10 THEN
                RAISE EXCEPTION USING ERRCODE = '40001',
                    MESSAGE = 'claims were released and taken again while this append claimed them; retry';
            END IF;
        END LOOP;
    END IF;

    IF p_key_wrapped IS NOT NULL THEN
        INSERT INTO data_keys (owner_id, master_key_id, wrapped) VALUES (p_aggregate_id, p_key_master_id, p_key_wrapped);
    END IF;

    -- A new stream is not read first: a stream that exists holds version 1 (versions start at 1, without holes,
    -- and are never deleted), so the unique (aggregate_id, event_version) key refuses the insert instead.
    IF p_expected = 0 THEN
        found_version := 0;
    ELSE
        SELECT coalesce(max(e.event_version), 0) INTO found_version FROM events e WHERE e.aggregate_id = p_aggregate_id;
    END IF;
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
