-- One database per service (SPEC §2: no service reads another service's database).
--
-- Mounted into /docker-entrypoint-initdb.d/ by docker-compose.yml. The postgres image runs it ONCE,
-- when the data volume is initialised, as POSTGRES_USER, who therefore owns the databases.
-- A database added later needs a manual CREATE DATABASE on an existing volume.
-- The tables are created by the one-shot `migrate` service (`bridgepost migrate`), not here.

CREATE DATABASE subscriptions;
CREATE DATABASE events;
CREATE DATABASE mailer;
