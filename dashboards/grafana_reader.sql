-- A read-only PostgreSQL role for Grafana's tunewatch dashboards.
--
-- Run it with psql as the role that owns the tunewatch tables (the one `tunewatch db upgrade`
-- connects as), after the migrations. It is idempotent: run it again after an upgrade, or to
-- change the password.
--
--   psql "postgresql://OWNER@HOST/DB" -v ON_ERROR_STOP=1 \
--        -v grafana_password="$GRAFANA_DB_PASSWORD" -f dashboards/grafana_reader.sql
--
-- psql variables (-v NAME=VALUE):
--   grafana_password  required: the role's password (the Grafana datasource logs in with it)
--   grafana_role      the role's name (default tunewatch_grafana)
--   schema            the schema of the tunewatch tables (default public)
--
-- The role gets LOGIN, USAGE on the schema and SELECT on its tables, with two limits:
-- of `samples` it reads only the metadata columns, never the sampled production inputs and
-- outputs; and it cannot write, create objects or read other schemas. Tables that later
-- migrations create are readable too (default privileges of the role running this script).
-- Its sessions are read-only by default and stop queries after 30 s.
-- On PostgreSQL 14 or older, also run `REVOKE CREATE ON SCHEMA public FROM PUBLIC` once:
-- those versions let every role create tables in `public`.

\set ON_ERROR_STOP 1
\set QUIET 1

\if :{?grafana_role}
\else
  \set grafana_role tunewatch_grafana
\endif
\if :{?schema}
\else
  \set schema public
\endif
\if :{?grafana_password}
\else
  DO $$ BEGIN
    RAISE EXCEPTION 'grafana_reader.sql needs a password: psql -v grafana_password=... -f dashboards/grafana_reader.sql';
  END $$;
\endif

-- The role: created once, its password and limits set on every run. psql quotes the values
-- (:'name' as a literal, :"name" as an identifier), so no value is pasted into SQL unquoted.
SELECT format('CREATE ROLE %I', :'grafana_role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'grafana_role')
\gexec

ALTER ROLE :"grafana_role" WITH LOGIN NOINHERIT NOCREATEDB NOCREATEROLE CONNECTION LIMIT 20
  PASSWORD :'grafana_password';
ALTER ROLE :"grafana_role" SET default_transaction_read_only = on;
ALTER ROLE :"grafana_role" SET statement_timeout = '30s';
-- Dashboards name tables without a schema.
ALTER ROLE :"grafana_role" IN DATABASE :"DBNAME" SET search_path = :"schema";

-- What it may read.
GRANT CONNECT ON DATABASE :"DBNAME" TO :"grafana_role";
GRANT USAGE ON SCHEMA :"schema" TO :"grafana_role";
GRANT SELECT ON ALL TABLES IN SCHEMA :"schema" TO :"grafana_role";

-- samples holds sampled production inputs and outputs: the dashboards only count rows (and
-- join labels by request_id for the label coverage).
-- (Revoking the table privilege also drops column privileges, so re-runs start clean.)
REVOKE SELECT ON TABLE :"schema".samples FROM :"grafana_role";
GRANT SELECT (id, model, version, arm, ts, source, input_kind, request_id)
  ON TABLE :"schema".samples TO :"grafana_role";

-- Tables created later by this role (migrations) are readable without re-running the script.
ALTER DEFAULT PRIVILEGES IN SCHEMA :"schema" GRANT SELECT ON TABLES TO :"grafana_role";

\echo grafana_reader.sql: role :grafana_role can read schema :schema of database :DBNAME
