//! The replicated table every simulated node holds: one column of each policy.

use accord_engine::{ColumnDef, ColumnPolicy, ColumnType, KeyColumn, RowKey, TableDef, Value};

pub const TABLE: &str = "shop.items";
/// Column indexes, in table order.
pub const NAME: usize = 0;
pub const STOCK: usize = 1;
pub const PRICE: usize = 2;
pub const PRICE_COLUMN: &str = "price";
/// The prices writers choose from: few, so concurrent writes sometimes agree.
pub const PRICES: [&str; 4] = ["10", "20", "30", "40"];
/// A reviewer's own value, not among the candidates.
pub const REVIEWER_PRICE: &str = "99";

/// `shop.items(id bigint primary key, name text @accord lww, stock bigint @accord delta,
/// price text @accord review)`.
pub fn table() -> TableDef {
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
    }
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
        super::table().validate().unwrap();
    }
}
