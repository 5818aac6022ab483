use std::fmt;

/// Where an annotation was written: a table's comment or a column's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Place {
    Table { table: String },
    Column { table: String, column: String },
}

impl Place {
    pub fn table(&self) -> &str {
        match self {
            Place::Table { table } | Place::Column { table, .. } => table,
        }
    }

    pub fn column(&self) -> Option<&str> {
        match self {
            Place::Table { .. } => None,
            Place::Column { column, .. } => Some(column),
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Table { table } => write!(f, "table {table}"),
            Place::Column { table, column } => write!(f, "column {table}.{column}"),
        }
    }
}
