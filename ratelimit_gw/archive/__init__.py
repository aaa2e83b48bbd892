"""The ledger archive in PostgreSQL (SPEC §16, docs/archive.md).

Redis holds live state; PostgreSQL is the system of record for money. :mod:`.database`
connects and applies the schema's migrations (:mod:`.migrations`, SQL files in order);
:mod:`.ledger_rows` turns a Redis ledger entry into its row; :mod:`.archiver` copies every
stream and trims what Postgres has committed, while holding the :mod:`.lease` that makes it
the only archiver across instances; :mod:`.snapshots` copies account and key records;
:mod:`.reports` answers usage questions; :mod:`.history` pages an account's ledger on into
the archive (both read through :mod:`.reading`); :mod:`.restore` rebuilds an empty Redis
from it.

asyncpg is an optional dependency (``pip install 'ratelimit-gw[archive]'``): a gateway
without ``[archive]`` never imports it.
"""
