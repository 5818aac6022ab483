//! PostgreSQL type names, as `format_type` spells them, to the engine's column types.

use accord_engine::ColumnType;

/// The engine's type for a column whose type `format_type(atttypid, atttypmod)` prints as `name`.
/// Domains and every other type keep their own name: the engine then only compares them for
/// equality, and `delta` refuses them (a domain's checks could reject a merged sum).
pub fn column_type(name: &str) -> ColumnType {
    match name {
        "smallint" => ColumnType::SmallInt,
        "integer" => ColumnType::Integer,
        "bigint" => ColumnType::BigInt,
        "money" => ColumnType::Money,
        "real" => ColumnType::Real,
        "double precision" => ColumnType::DoublePrecision,
        "numeric" => ColumnType::Numeric {
            precision: None,
            scale: None,
        },
        other => numeric_with_typmod(other).unwrap_or_else(|| ColumnType::Other(other.to_string())),
    }
}

/// `numeric(p,s)`; PostgreSQL always prints both numbers.
fn numeric_with_typmod(name: &str) -> Option<ColumnType> {
    let inner = name.strip_prefix("numeric(")?.strip_suffix(')')?;
    let (precision, scale) = inner.split_once(',')?;
    Some(ColumnType::Numeric {
        precision: Some(precision.trim().parse().ok()?),
        scale: Some(scale.trim().parse().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_type_names_map_to_engine_types() {
        assert_eq!(column_type("integer"), ColumnType::Integer);
        assert_eq!(column_type("smallint"), ColumnType::SmallInt);
        assert_eq!(column_type("bigint"), ColumnType::BigInt);
        assert_eq!(column_type("money"), ColumnType::Money);
        assert_eq!(column_type("real"), ColumnType::Real);
        assert_eq!(column_type("double precision"), ColumnType::DoublePrecision);
        assert_eq!(
            column_type("numeric"),
            ColumnType::Numeric {
                precision: None,
                scale: None
            }
        );
        assert_eq!(
            column_type("numeric(12,2)"),
            ColumnType::Numeric {
                precision: Some(12),
                scale: Some(2)
            }
        );
        for other in [
            "text",
            "integer[]",
            "numeric(12,2)[]",
            "numeric(x,2)",
            "timestamp with time zone",
        ] {
            assert_eq!(column_type(other), ColumnType::Other(other.to_string()));
        }
    }
}
