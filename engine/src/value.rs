//! Column values and the exact arithmetic of `delta` columns.
//!
//! Values other than exact numerics travel as PostgreSQL's text output: the engine only compares
//! them for equality, and text is what logical decoding delivers. Numerics are kept exact: a
//! `numeric(40,10)` delta must not pass through a float.

use std::fmt;
use std::str::FromStr;

use bigdecimal::{BigDecimal, Zero};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::schema::ColumnType;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Value {
    Null,
    /// smallint, integer and bigint.
    Int(i64),
    /// numeric and money, exact.
    Numeric(BigDecimal),
    /// Every other type, in PostgreSQL's text form.
    Text(String),
}

impl Value {
    pub fn text(s: impl Into<String>) -> Self {
        Value::Text(s.into())
    }

    /// Parses PostgreSQL's text output of a column of type `ty` into a value.
    pub fn parse(ty: &ColumnType, text: &str) -> Result<Self, ValueError> {
        let bad = || ValueError::Unparsable {
            ty: ty.to_string(),
            text: text.chars().take(64).collect(),
        };
        match ty {
            ColumnType::SmallInt | ColumnType::Integer | ColumnType::BigInt => {
                let v = text.trim().parse::<i64>().map_err(|_| bad())?;
                check_range(ty, &Value::Int(v))?;
                Ok(Value::Int(v))
            }
            ColumnType::Numeric { .. } => {
                let d = BigDecimal::from_str(text.trim()).map_err(|_| bad())?;
                Ok(Value::Numeric(d))
            }
            ColumnType::Money => {
                // money's text output carries a currency symbol and group separators ("-$1,234.50");
                // this assumes a locale whose decimal point is '.', as the C and en_* locales have.
                let plain: String = text
                    .chars()
                    .filter(|c| c.is_ascii_digit() || matches!(c, '-' | '.'))
                    .collect();
                let d = BigDecimal::from_str(&plain).map_err(|_| bad())?;
                Ok(Value::Numeric(d))
            }
            _ => Ok(Value::Text(text.to_owned())),
        }
    }

    /// Feeds a canonical, platform-independent encoding to a hasher (for ids every node derives).
    pub(crate) fn hash_into(&self, hasher: &mut blake3::Hasher) {
        match self {
            Value::Null => {
                hasher.update(&[0]);
            }
            Value::Int(v) => {
                hasher.update(&[1]);
                hasher.update(&v.to_be_bytes());
            }
            Value::Numeric(d) => {
                let text = d.normalized().to_string();
                hasher.update(&[2]);
                hasher.update(&(text.len() as u64).to_be_bytes());
                hasher.update(text.as_bytes());
            }
            Value::Text(s) => {
                hasher.update(&[3]);
                hasher.update(&(s.len() as u64).to_be_bytes());
                hasher.update(s.as_bytes());
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(v) => write!(f, "{v}"),
            // Plain digits, never an exponent: this is also the form PostgreSQL reads back.
            Value::Numeric(d) => f.write_str(&d.to_plain_string()),
            Value::Text(s) => f.write_str(s),
        }
    }
}

impl Value {
    /// PostgreSQL's text input form of the value; `None` for NULL.
    pub fn to_pg_text(&self) -> Option<String> {
        match self {
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    #[error("value {value} does not fit in {ty}")]
    Overflow { ty: String, value: String },
    #[error("a delta column of type {ty} holds NULL; delta columns must be NOT NULL (a NULL has no sum)")]
    NullInDelta { ty: String },
    #[error("a delta column of type {ty} holds {found}, which is not a number of that type")]
    TypeMismatch { ty: String, found: String },
    #[error("cannot read {text:?} as {ty}")]
    Unparsable { ty: String, text: String },
}

/// An exact amount added to a `delta` column. Integers sum in `i128` so that the difference of two
/// bigints, or many contributions, cannot overflow before the column's own range is checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Amount {
    Int(i128),
    Decimal(BigDecimal),
}

impl Amount {
    pub fn zero_for(ty: &ColumnType) -> Self {
        if ty.is_integer() {
            Amount::Int(0)
        } else {
            Amount::Decimal(BigDecimal::from(0))
        }
    }

    pub fn is_zero(&self) -> bool {
        match self {
            Amount::Int(v) => *v == 0,
            Amount::Decimal(d) => d.is_zero(),
        }
    }

    pub fn checked_add(&self, other: &Amount) -> Option<Amount> {
        match (self, other) {
            (Amount::Int(a), Amount::Int(b)) => a.checked_add(*b).map(Amount::Int),
            (Amount::Decimal(a), Amount::Decimal(b)) => Some(Amount::Decimal(a + b)),
            _ => None,
        }
    }

    pub fn checked_sub(&self, other: &Amount) -> Option<Amount> {
        match (self, other) {
            (Amount::Int(a), Amount::Int(b)) => a.checked_sub(*b).map(Amount::Int),
            (Amount::Decimal(a), Amount::Decimal(b)) => Some(Amount::Decimal(a - b)),
            _ => None,
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Int(v) => write!(f, "{v}"),
            Amount::Decimal(d) => write!(f, "{d}"),
        }
    }
}

/// The value of a delta column as an amount, refusing NULL and values of the wrong kind.
pub fn as_amount(ty: &ColumnType, value: &Value) -> Result<Amount, ValueError> {
    match (value, ty.is_integer()) {
        (Value::Int(v), true) => Ok(Amount::Int(i128::from(*v))),
        (Value::Numeric(d), false) => Ok(Amount::Decimal(d.clone())),
        (Value::Null, _) => Err(ValueError::NullInDelta { ty: ty.to_string() }),
        (other, _) => Err(ValueError::TypeMismatch {
            ty: ty.to_string(),
            found: other.to_string(),
        }),
    }
}

/// `new − old` for a delta column.
pub fn difference(ty: &ColumnType, new: &Value, old: &Value) -> Result<Amount, ValueError> {
    let new = as_amount(ty, new)?;
    let old = as_amount(ty, old)?;
    new.checked_sub(&old).ok_or_else(|| ValueError::Overflow {
        ty: ty.to_string(),
        value: format!("{new} - {old}"),
    })
}

/// `value + amount`, checked against the range of the column's type: an overflow is an error,
/// never a wrapped or rounded value.
pub fn add_checked(ty: &ColumnType, value: &Value, amount: &Amount) -> Result<Value, ValueError> {
    let current = as_amount(ty, value)?;
    let overflow = || ValueError::Overflow {
        ty: ty.to_string(),
        value: format!("{current} + {amount}"),
    };
    let sum = current.checked_add(amount).ok_or_else(overflow)?;
    let result = match sum {
        Amount::Int(v) => Value::Int(i64::try_from(v).map_err(|_| overflow())?),
        Amount::Decimal(d) => Value::Numeric(d),
    };
    check_range(ty, &result)?;
    Ok(result)
}

/// Whether `value` fits the column type without rounding or wrapping.
pub fn check_range(ty: &ColumnType, value: &Value) -> Result<(), ValueError> {
    let overflow = || ValueError::Overflow {
        ty: ty.to_string(),
        value: value.to_string(),
    };
    match (ty, value) {
        (ColumnType::SmallInt, Value::Int(v)) => i16::try_from(*v).map(drop).map_err(|_| overflow()),
        (ColumnType::Integer, Value::Int(v)) => i32::try_from(*v).map(drop).map_err(|_| overflow()),
        (ColumnType::BigInt, Value::Int(_)) => Ok(()),
        (ColumnType::Numeric { precision, scale }, Value::Numeric(d)) => {
            // PostgreSQL's own limits for an unconstrained numeric.
            let (max_int_digits, max_scale) = match precision {
                Some(p) => {
                    let s = scale.unwrap_or(0);
                    (i64::from(*p) - i64::from(s), i64::from(s))
                }
                None => (131_072, 16_383),
            };
            if d.fractional_digit_count() > max_scale || integer_digits(d) > max_int_digits {
                return Err(overflow());
            }
            Ok(())
        }
        (ColumnType::Money, Value::Numeric(d)) => {
            // money is a 64-bit count of cents.
            let cents = d * BigDecimal::from(100);
            let limit = BigDecimal::from(i64::MAX);
            if d.fractional_digit_count() > 2 || cents.abs() > limit {
                return Err(overflow());
            }
            Ok(())
        }
        (_, Value::Null) => Ok(()),
        (ty, _) if !ty.is_exact_numeric() => Ok(()),
        (ty, other) => Err(ValueError::TypeMismatch {
            ty: ty.to_string(),
            found: other.to_string(),
        }),
    }
}

/// Digits before the decimal point (0 for |d| < 1).
fn integer_digits(d: &BigDecimal) -> i64 {
    if d.is_zero() {
        return 0;
    }
    let (digits, scale) = d.normalized().as_bigint_and_exponent();
    let total = BigDecimal::new(digits, 0).digits() as i64;
    (total - scale).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Value {
        Value::Numeric(BigDecimal::from_str(s).unwrap())
    }

    fn numeric(p: u32, s: u32) -> ColumnType {
        ColumnType::Numeric {
            precision: Some(p),
            scale: Some(s),
        }
    }

    #[test]
    fn numeric_deltas_stay_exact_at_high_precision() {
        let ty = numeric(40, 10);
        let old = dec("123456789012345678901234567890.0000000001");
        let new = dec("123456789012345678901234567890.0000000003");
        let delta = difference(&ty, &new, &old).unwrap();
        assert_eq!(delta, Amount::Decimal(BigDecimal::from_str("0.0000000002").unwrap()));
        let sum = add_checked(&ty, &new, &delta).unwrap();
        assert_eq!(sum, dec("123456789012345678901234567890.0000000005"));
    }

    #[test]
    fn integer_types_overflow_instead_of_wrapping() {
        let err = add_checked(&ColumnType::SmallInt, &Value::Int(32_760), &Amount::Int(8)).unwrap_err();
        assert!(matches!(err, ValueError::Overflow { .. }), "{err}");
        assert_eq!(
            add_checked(&ColumnType::SmallInt, &Value::Int(32_760), &Amount::Int(7)).unwrap(),
            Value::Int(32_767)
        );
        assert!(add_checked(&ColumnType::Integer, &Value::Int(i64::from(i32::MAX)), &Amount::Int(1)).is_err());
        assert!(add_checked(&ColumnType::BigInt, &Value::Int(i64::MAX), &Amount::Int(1)).is_err());
        assert_eq!(
            difference(&ColumnType::BigInt, &Value::Int(i64::MAX), &Value::Int(i64::MIN)).unwrap(),
            Amount::Int(i128::from(i64::MAX) - i128::from(i64::MIN))
        );
    }

    #[test]
    fn numeric_precision_is_enforced() {
        let ty = numeric(5, 2);
        assert!(add_checked(
            &ty,
            &dec("999.00"),
            &Amount::Decimal(BigDecimal::from_str("0.99").unwrap())
        )
        .is_ok());
        assert!(add_checked(
            &ty,
            &dec("999.99"),
            &Amount::Decimal(BigDecimal::from_str("0.01").unwrap())
        )
        .is_err());
        assert!(check_range(&ty, &dec("1.001")).is_err());
        assert!(check_range(&ColumnType::Money, &dec("92233720368547758.07")).is_ok());
        assert!(check_range(&ColumnType::Money, &dec("92233720368547758.08")).is_err());
    }

    #[test]
    fn null_and_mismatched_values_are_refused() {
        assert!(matches!(
            difference(&ColumnType::Integer, &Value::Int(1), &Value::Null),
            Err(ValueError::NullInDelta { .. })
        ));
        assert!(matches!(
            as_amount(&ColumnType::Integer, &Value::text("x")),
            Err(ValueError::TypeMismatch { .. })
        ));
    }

    #[test]
    fn parse_reads_text_output() {
        assert_eq!(Value::parse(&ColumnType::Integer, "42").unwrap(), Value::Int(42));
        assert_eq!(Value::parse(&numeric(10, 2), "-1.50").unwrap(), dec("-1.5"));
        assert!(Value::parse(&ColumnType::SmallInt, "70000").is_err());
        assert!(Value::parse(&ColumnType::Integer, "4x").is_err());
        assert_eq!(
            Value::parse(&ColumnType::Other("text".into()), "hi").unwrap(),
            Value::text("hi")
        );
    }
}
