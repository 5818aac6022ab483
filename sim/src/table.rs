//! The replicated table every simulated node holds: one column of each policy.

use std::sync::OnceLock;

use accord_engine::{ColumnDef, ColumnPolicy, ColumnType, InsertPolicy, KeyColumn, RowKey, ShapeBook, TableDef, Value};

pub const TABLE: &str = "shop.items";
/// Column indexes, in table order.
pub const NAME: usize = 0;
pub const STOCK: usize = 1;
pub const PRICE: usize = 2;
pub const PRICE_COLUMN: &str = "price";
/// The column a migration adds (`migrated`), after the others.
pub const SOLD: usize = 3;
/// The prices writers choose from: few, so concurrent writes sometimes agree.
pub const PRICES: [&str; 4] = ["10", "20", "30", "40"];
/// A reviewer's own value, not among the candidates.
pub const REVIEWER_PRICE: &str = "99";

/// `shop.items(id bigint primary key, name text @accord lww, stock bigint @accord delta,
/// price text @accord review)`.
pub fn table(inserts: InsertPolicy) -> TableDef {
    let col = |name: &str, ty, policy| ColumnDef {
        name: name.into(),
        ty,
        policy,
    };
    TableDef {
        name: TABLE.into(),
        key: vec![KeyColumn {
            name: "id".into(),
            ty: ColumnType::BigInt,
        }],
        columns: vec![
            col("name", ColumnType::Other("text".into()), ColumnPolicy::Lww),
            col("stock", ColumnType::BigInt, ColumnPolicy::Delta),
            col(PRICE_COLUMN, ColumnType::Other("text".into()), ColumnPolicy::Review),
        ],
        inserts,
    }
}

/// The table after the migration nodes run while the cluster runs (`--migrate`): `ALTER TABLE
/// shop.items ADD COLUMN sold bigint NOT NULL DEFAULT 0` with `@accord delta`.
pub fn migrated(inserts: InsertPolicy) -> TableDef {
    let mut def = table(inserts);
    def.columns.push(ColumnDef {
        name: "sold".into(),
        ty: ColumnType::BigInt,
        policy: ColumnPolicy::Delta,
    });
    def
}

/// Both shapes of the table, as every node's `accord.shapes` comes to hold them (for either
/// meaning of two inserts of one key: a run uses one).
pub fn shapes() -> &'static ShapeBook {
    static BOOK: OnceLock<ShapeBook> = OnceLock::new();
    BOOK.get_or_init(|| {
        let mut book = ShapeBook::default();
        for inserts in [InsertPolicy::Merge, InsertPolicy::Review] {
            book.learn(table(inserts));
            book.learn(migrated(inserts));
        }
        book
    })
}

/// What a row the migrated table holds had in `sold` before it had the column.
pub fn sold_default() -> Value {
    Value::Int(0)
}

pub fn row_key(key: i64) -> RowKey {
    RowKey(vec![Value::Int(key)])
}

/// The key of a change of this table (its only key column is a bigint).
pub fn key_of(key: &RowKey) -> Option<i64> {
    match key.0.as_slice() {
        [Value::Int(k)] => Some(*k),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_table_is_valid() {
        super::table(accord_engine::InsertPolicy::Review).validate().unwrap();
        super::migrated(accord_engine::InsertPolicy::Merge).validate().unwrap();
    }
}
