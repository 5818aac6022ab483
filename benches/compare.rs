//! accord beside PostgreSQL's native logical replication and pglogical (issue 8). Placeholder.

fn main() {
    eprintln!("the comparison bench is not built yet");
    std::process::exit(1);
}
