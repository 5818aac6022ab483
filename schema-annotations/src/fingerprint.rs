//! A digest of a schema policy that every node computes alike.
//!
//! The input is a canonical byte encoding built here field by field, not a serde format or a
//! `Debug`/`Display` string, so that a change of a library, of a derive, or of how a type prints
//! cannot change a fingerprint unnoticed. Every string and list is length-prefixed, so no two
//! different policies encode to the same bytes. A change to the encoding must change `CONTEXT`.

use std::fmt;

use accord_engine::{ColumnType, InsertPolicy, TableDef};

/// blake3's key-derivation mode with a context of its own, so that these digests cannot collide
/// with blake3 digests accord takes of anything else.
const CONTEXT: &str = "accord 2025-01 schema policy fingerprint v1";

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

/// The fingerprint of tables that are already in canonical order (`SchemaPolicy` keeps them so).
pub(crate) fn of(tables: &[TableDef]) -> Fingerprint {
    let mut out = Encoder(blake3::Hasher::new_derive_key(CONTEXT));
    out.len(tables.len());
    for table in tables {
        out.str(&table.name);
        out.len(table.key.len());
        for key in &table.key {
            out.str(&key.name);
            out.ty(&key.ty);
        }
        out.len(table.columns.len());
        for column in &table.columns {
            out.str(&column.name);
            out.ty(&column.ty);
            out.str(column.policy.keyword());
        }
    }
    // Appended after every table, and only when some table is not the default, so that policies
    // written before the option keep their fingerprints (the table list is length-prefixed, so
    // the tail cannot be mistaken for a table).
    let review_inserts: Vec<&TableDef> = tables.iter().filter(|t| t.inserts != InsertPolicy::Merge).collect();
    if !review_inserts.is_empty() {
        out.str("inserts");
        out.len(review_inserts.len());
        for table in review_inserts {
            out.str(&table.name);
            out.str(table.inserts.keyword());
        }
    }
    Fingerprint(*out.0.finalize().as_bytes())
}

struct Encoder(blake3::Hasher);

impl Encoder {
    fn len(&mut self, n: usize) {
        self.0.update(&(n as u64).to_le_bytes());
    }

    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.update(s.as_bytes());
    }

    fn opt(&mut self, n: Option<u32>) {
        match n {
            None => self.0.update(&[0]),
            Some(n) => self.0.update(&[1]).update(&n.to_le_bytes()),
        };
    }

    fn ty(&mut self, ty: &ColumnType) {
        match ty {
            ColumnType::SmallInt => self.str("smallint"),
            ColumnType::Integer => self.str("integer"),
            ColumnType::BigInt => self.str("bigint"),
            ColumnType::Numeric { precision, scale } => {
                self.str("numeric");
                self.opt(*precision);
                self.opt(*scale);
            }
            ColumnType::Money => self.str("money"),
            ColumnType::Real => self.str("real"),
            ColumnType::DoublePrecision => self.str("double precision"),
            ColumnType::Other(name) => {
                self.str("other");
                self.str(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use accord_engine::{ColumnDef, ColumnPolicy, KeyColumn};

    use crate::SchemaPolicy;

    use super::*;

    fn products(stock: ColumnType, price_policy: ColumnPolicy) -> TableDef {
        TableDef {
            name: "shop.products".into(),
            key: vec![KeyColumn {
                name: "id".into(),
                ty: ColumnType::BigInt,
            }],
            columns: vec![
                ColumnDef {
                    name: "stock".into(),
                    ty: stock,
                    policy: ColumnPolicy::Delta,
                },
                ColumnDef {
                    name: "price".into(),
                    ty: ColumnType::Numeric {
                        precision: Some(12),
                        scale: Some(2),
                    },
                    policy: price_policy,
                },
                ColumnDef {
                    name: "name".into(),
                    ty: ColumnType::Other("text".into()),
                    policy: ColumnPolicy::Lww,
                },
            ],
            inserts: Default::default(),
        }
    }

    fn policy(tables: Vec<TableDef>) -> SchemaPolicy {
        SchemaPolicy::new(tables).expect("test tables are valid")
    }

    #[test]
    fn the_encoding_is_pinned() {
        // Nodes of different accord versions compare this digest: it must not change by accident.
        let fp = policy(vec![products(ColumnType::Integer, ColumnPolicy::Review)]).fingerprint();
        assert_eq!(
            fp.to_hex(),
            "38409b23f192652656d02555016085fdb6e6ebf6fe9a68114190b55b54257071"
        );
    }

    #[test]
    fn order_of_tables_and_columns_does_not_matter() {
        let mut reversed = products(ColumnType::Integer, ColumnPolicy::Review);
        reversed.columns.reverse();
        let other = TableDef {
            name: "shop.orders".into(),
            ..products(ColumnType::BigInt, ColumnPolicy::Lww)
        };
        assert_eq!(
            policy(vec![products(ColumnType::Integer, ColumnPolicy::Review), other.clone()]).fingerprint(),
            policy(vec![other, reversed]).fingerprint()
        );
    }

    #[test]
    fn any_difference_changes_it() {
        let base = products(ColumnType::Integer, ColumnPolicy::Review);
        let fp = |t: TableDef| policy(vec![t]).fingerprint();
        let mut variants = vec![
            products(ColumnType::BigInt, ColumnPolicy::Review),
            products(ColumnType::Integer, ColumnPolicy::Lww),
            TableDef {
                name: "shop.product".into(),
                ..base.clone()
            },
            base.clone().with_inserts(InsertPolicy::Review),
        ];
        let mut renamed = base.clone();
        renamed.columns[2].name = "title".into();
        variants.push(renamed);
        let mut scale = base.clone();
        scale.columns[1].ty = ColumnType::Numeric {
            precision: Some(12),
            scale: Some(3),
        };
        variants.push(scale);
        let mut unconstrained = base.clone();
        unconstrained.columns[1].ty = ColumnType::Numeric {
            precision: None,
            scale: None,
        };
        variants.push(unconstrained);
        let mut key_type = base.clone();
        key_type.key[0].ty = ColumnType::Integer;
        variants.push(key_type);
        let mut fewer = base.clone();
        fewer.columns.pop();
        variants.push(fewer);
        let mut seen = vec![fp(base)];
        for variant in variants {
            let f = fp(variant);
            assert!(!seen.contains(&f), "{f:?} repeats");
            seen.push(f);
        }
        assert_ne!(policy(vec![]).fingerprint(), seen[0]);
    }

    #[test]
    fn names_cannot_run_into_each_other() {
        let key_named = |key: &str, column: &str| TableDef {
            name: "t".into(),
            key: vec![KeyColumn {
                name: key.into(),
                ty: ColumnType::Other("text".into()),
            }],
            columns: vec![ColumnDef {
                name: column.into(),
                ty: ColumnType::Other("text".into()),
                policy: ColumnPolicy::Lww,
            }],
            inserts: Default::default(),
        };
        assert_ne!(
            policy(vec![key_named("ab", "c")]).fingerprint(),
            policy(vec![key_named("a", "bc")]).fingerprint()
        );
    }
}
