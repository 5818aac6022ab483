//! TRUNCATE of one partition of a replicated partitioned table is refused: accord publishes the
//! table through its root, and PostgreSQL does not publish a partition's TRUNCATE then, so the
//! rows would go on this node only. (TRUNCATE of the table itself replicates, as a delete of
//! every row: ARCHITECTURE.md, "TRUNCATE".) `SET accord.allow_truncate = on` empties one
//! node's partition on purpose. `accord.prepare_partitions` puts the trigger on every partition.

use anyhow::{Context, Result};
use tokio_postgres::GenericClient;

const REFUSE_FUNCTION: &str = "
CREATE OR REPLACE FUNCTION accord.refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $accord$
BEGIN
    IF pg_catalog.current_setting('accord.allow_truncate', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'TRUNCATE of partition %.% is refused: accord replicates the partitioned table as one table, and PostgreSQL does not publish the TRUNCATE of one partition, so the other nodes would keep its rows',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'feature_not_supported',
              HINT = 'DELETE FROM the partition, or TRUNCATE the whole table: both replicate. To empty this node''s partition only, SET accord.allow_truncate = on first.';
END
$accord$;
";

/// Creates the trigger function the partitions' guards call.
pub async fn install_function(db: &impl GenericClient) -> Result<()> {
    db.batch_execute(REFUSE_FUNCTION)
        .await
        .context("cannot create accord.refuse_truncate()")
}
