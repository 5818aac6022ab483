//! A database's relations as accord reads them from the catalog, before any checking. Kept free of
//! PostgreSQL so that the checks can be tested, and driven by the simulator, without a server.

/// One relation whose comment, or one of whose columns' comments, may hold a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogTable {
    pub schema: String,
    pub name: String,
    pub kind: RelationKind,
    /// For a partition: the partitioned table at the top of its tree (`schema.table`), through
    /// which its changes replicate.
    pub partition_of: Option<String>,
    pub replica_identity: ReplicaIdentity,
    /// `UNLOGGED`: its changes never reach the WAL, so logical decoding cannot see them.
    pub unlogged: bool,
    pub comment: Option<String>,
    /// In any order; the checks put them in their canonical order.
    pub columns: Vec<CatalogColumn>,
}

impl CatalogTable {
    /// The name accord uses for the table everywhere: `schema.table`.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogColumn {
    pub name: String,
    /// As `format_type(atttypid, atttypmod)` prints it.
    pub type_name: String,
    pub not_null: bool,
    /// The column's default expression, as `pg_get_expr` prints it.
    pub default: Option<String>,
    /// An identity column (`GENERATED ... AS IDENTITY`).
    pub identity: bool,
    /// A generated column, which every node computes for itself.
    pub generated: bool,
    /// Position in the primary key, from 1; `None` when not part of it.
    pub key_position: Option<u32>,
    pub comment: Option<String>,
}

/// `pg_class.relkind`, for the kinds that can carry comments on columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelationKind {
    Table,
    PartitionedTable,
    View,
    MaterializedView,
    ForeignTable,
    Other,
}

impl RelationKind {
    pub fn from_relkind(relkind: &str) -> Self {
        match relkind {
            "r" => RelationKind::Table,
            "p" => RelationKind::PartitionedTable,
            "v" => RelationKind::View,
            "m" => RelationKind::MaterializedView,
            "f" => RelationKind::ForeignTable,
            _ => RelationKind::Other,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            RelationKind::Table => "table",
            RelationKind::PartitionedTable => "partitioned table",
            RelationKind::View => "view",
            RelationKind::MaterializedView => "materialized view",
            RelationKind::ForeignTable => "foreign table",
            RelationKind::Other => "relation",
        }
    }
}

/// `pg_class.relreplident`: which old values logical decoding sees for updates and deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

impl ReplicaIdentity {
    pub fn from_relreplident(relreplident: &str) -> Self {
        match relreplident {
            "f" => ReplicaIdentity::Full,
            "n" => ReplicaIdentity::Nothing,
            "i" => ReplicaIdentity::Index,
            _ => ReplicaIdentity::Default,
        }
    }

    pub fn keyword(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "DEFAULT",
            ReplicaIdentity::Nothing => "NOTHING",
            ReplicaIdentity::Full => "FULL",
            ReplicaIdentity::Index => "USING INDEX",
        }
    }
}
