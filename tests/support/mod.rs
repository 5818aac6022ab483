//! Shared by the integration tests: `mod support;` in a test file. Each test file is its own crate
//! and uses only part of this, hence the allowance for unused items.
#![allow(dead_code)]

pub mod cli;
pub mod env;
pub mod nodes;
pub mod pg;
pub mod service;
