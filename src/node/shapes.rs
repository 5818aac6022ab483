//! The shapes of its tables a node knows (`engine::shape`), kept in `accord.shapes`: its own,
//! each one it captured under, and every one a peer described (`Message::Shapes`). A change names
//! its shape, and may be applied, or kept for later, long after the sender's table changed
//! again: the shapes stay.

use accord_engine::{ShapeBook, TableDef};
use tokio_postgres::GenericClient;

use super::store::{decode, encode, shape_param, StoreError};

pub const SHAPES_DDL: &str = "
CREATE TABLE IF NOT EXISTS accord.shapes (
    id          bigint  PRIMARY KEY,
    table_name  text    NOT NULL,
    def         bytea   NOT NULL,
    own         boolean NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE accord.shapes IS 'accord: the shapes of the replicated tables this node and its peers wrote changes under';
";

/// Records `def`; `own`: this node's (once its own, always).
pub async fn record(db: &impl GenericClient, def: &TableDef, own: bool) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO accord.shapes (id, table_name, def, own) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET own = accord.shapes.own OR EXCLUDED.own",
        &[
            &shape_param(def.shape_id()),
            &def.name,
            &encode("a table's shape", def)?,
            &own,
        ],
    )
    .await?;
    Ok(())
}

/// Every recorded shape, with whether it is this node's own, in the order they were recorded.
pub async fn load(db: &impl GenericClient) -> Result<Vec<(TableDef, bool)>, StoreError> {
    let rows = db
        .query("SELECT def, own FROM accord.shapes ORDER BY recorded_at, id", &[])
        .await?;
    rows.iter()
        .map(|row| Ok((decode("a table's shape", row.get(0))?, row.get(1))))
        .collect()
}

/// The book of `shapes` (as [`load`] gives them): metadata stored before it named its shape was
/// stored under the first shape of its table this node recorded, its shape when shapes began.
pub fn book(shapes: &[(TableDef, bool)]) -> ShapeBook {
    let mut book = ShapeBook::default();
    let mut first = std::collections::BTreeSet::new();
    for (def, own) in shapes {
        if *own && first.insert(def.name.clone()) {
            book.set_unnamed(&def.name, def.shape_id());
        }
        book.learn(def.clone());
    }
    book
}
