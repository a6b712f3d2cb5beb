-- Roles per deployment. Roles belong to the cluster, not the database: two deployments on one cluster that both
-- granted their database to `kiroku_query` would let each other's services in. `kiroku_apply_role_prefix`, run
-- by the migrator after the migrations (with KIROKU_DATABASE_ROLE_PREFIX), moves every privilege the `kiroku_*`
-- roles hold in this database to `<prefix>_command`, `<prefix>_query` and `<prefix>_projector` (made if missing),
-- and lets only those roles (and the owner) connect to it. With the default prefix, `kiroku`, the roles stay
-- what they are and only the CONNECT rule changes. Running it again changes nothing.
CREATE FUNCTION kiroku_apply_role_prefix(prefix text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    service text;
    base text;
    target text;
    granted record;
BEGIN
    IF prefix !~ '^[a-z][a-z0-9_]{0,40}$' THEN
        RAISE EXCEPTION 'a role prefix is a lower-case letter, then letters, digits and _ (at most 41)';
    END IF;
    FOREACH service IN ARRAY ARRAY['command', 'query', 'projector'] LOOP
        base := 'kiroku_' || service;
        target := prefix || '_' || service;
        IF target <> base THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', target);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
            FOR granted IN
                SELECT c.oid::regclass AS object, a.privilege_type
                FROM pg_class c, aclexplode(c.relacl) a
                WHERE c.relnamespace = 'public'::regnamespace AND a.grantee = base::regrole
            LOOP
                EXECUTE format('GRANT %s ON %s TO %I', granted.privilege_type, granted.object, target);
                EXECUTE format('REVOKE %s ON %s FROM %I', granted.privilege_type, granted.object, base);
            END LOOP;
            FOR granted IN
                SELECT p.oid::regprocedure AS object
                FROM pg_proc p, aclexplode(p.proacl) a
                WHERE p.pronamespace = 'public'::regnamespace AND a.grantee = base::regrole
                  AND a.privilege_type = 'EXECUTE'
            LOOP
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', granted.object, target);
                EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I', granted.object, base);
            END LOOP;
            IF EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a
                       WHERE n.nspname = 'public' AND a.grantee = base::regrole AND a.privilege_type = 'USAGE') THEN
                EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', target);
                EXECUTE format('REVOKE USAGE ON SCHEMA public FROM %I', base);
            END IF;
            EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM %I', current_database(), base);
        END IF;
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), target);
    END LOOP;
    -- Nobody else connects, and nobody but the owner creates objects where the SECURITY DEFINER functions look.
    BEGIN
        EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
        REVOKE CREATE ON SCHEMA public FROM PUBLIC;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE WARNING 'the migrating role does not own the database: PUBLIC may still connect to it';
    END;
END
$$;
REVOKE ALL ON FUNCTION kiroku_apply_role_prefix(text) FROM PUBLIC;

-- A redaction must carry the `erased` marker: the check used to let one without it through (its comparison was
-- NULL, not false, when the marker was missing). Its search path holds no schema another role may write: only the
-- owner may create in `public` (above), and `pg_temp` comes last.
CREATE OR REPLACE FUNCTION kiroku_redact_events(positions bigint[], payloads jsonb[]) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    redacted integer;
BEGIN
    IF EXISTS (
        SELECT 1 FROM unnest(positions, payloads) AS r(position, payload)
        JOIN events e ON e.position = r.position
        WHERE NOT coalesce((r.payload - 'erased') <@ e.event_data AND r.payload -> 'erased' = 'true'::jsonb, false)
    ) THEN
        RAISE EXCEPTION 'a redaction may only remove members of an event''s payload, and must mark it erased';
    END IF;
    UPDATE events e SET event_data = r.payload
    FROM unnest(positions, payloads) AS r(position, payload)
    WHERE e.position = r.position;
    GET DIAGNOSTICS redacted = ROW_COUNT;
    RETURN redacted;
END
$$;
