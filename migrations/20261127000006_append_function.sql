-- An append in one statement: one round trip, and its own transaction (no BEGIN, no COMMIT on the wire). The
-- same steps, in the same order, as a transaction of separate statements (services/event-store/src/append.rs):
-- the idempotency key first (a concurrent repeat waits for this append, then replays its answer), the claims in
-- one fixed order (bytewise, so two appends cannot deadlock on them), the new owner's data key, the events at the
-- expected version, the stored answer. A taken claim or a version conflict raises an error that rolls it all
-- back: SQLSTATE KR409 (DETAIL: kind, value and owner, one per line) and KR412 (DETAIL: the version found).
-- Each statement in the function takes a fresh snapshot (READ COMMITTED), so the owner of a claim that a
-- concurrent append committed while this one waited is visible to the statement that looks it up.
CREATE FUNCTION kiroku_append(
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
    taken_kinds varchar[];
    taken_values varchar[];
    refused record;
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
        WITH inserted AS (
            INSERT INTO claims (kind, value, owner_id)
            SELECT w.kind, w.value, p_aggregate_id
            FROM (SELECT DISTINCT c.kind, c.value FROM unnest(p_claim_kinds, p_claim_values) AS c(kind, value)) w
            ORDER BY w.kind COLLATE "C", w.value COLLATE "C"
            ON CONFLICT DO NOTHING
            RETURNING claims.kind, claims.value
        )
        SELECT coalesce(array_agg(inserted.kind), '{}'), coalesce(array_agg(inserted.value), '{}')
        INTO taken_kinds, taken_values FROM inserted;
        SELECT c.kind, c.value, o.owner_id INTO refused
        FROM unnest(p_claim_kinds, p_claim_values) AS c(kind, value)
        JOIN claims o ON o.kind = c.kind AND o.value = c.value
        WHERE NOT EXISTS (SELECT 1 FROM unnest(taken_kinds, taken_values) AS t(kind, value)
                          WHERE t.kind = c.kind AND t.value = c.value)
        ORDER BY c.kind COLLATE "C", c.value COLLATE "C"
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'KR409', MESSAGE = 'claim taken',
                DETAIL = refused.kind || E'\n' || refused.value || E'\n' || refused.owner_id;
        END IF;
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

GRANT EXECUTE ON FUNCTION kiroku_append(uuid, varchar, integer, varchar[], varchar[], jsonb[], jsonb[],
    timestamptz[], varchar[], varchar[], varchar, varchar, jsonb, varchar, bytea) TO kiroku_command;
