//! `accord init` and `accord review` as a user runs them, on a real temporary cluster.

mod support;

use support::cli::accord;
use support::nodes::SHOP;
use support::pg::PgCluster;

#[tokio::test]
async fn init_prepares_a_database_once_and_refuses_mistakes() {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let db = pg.create_database("shop").await;
    db.batch_execute(SHOP).await.unwrap();
    db.batch_execute("INSERT INTO shop.products (id, name) VALUES (1, 'old row')")
        .await
        .unwrap();
    let dsn = pg.dsn("shop");

    let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", "1"]);
    assert!(ok, "{out}");
    assert!(out.contains("shop.products") && out.contains("shop.users"), "{out}");
    assert!(out.contains("1 existing rows recorded"), "{out}");
    let identity: String = db
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = 'shop.products'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(identity, "f", "REPLICA IDENTITY FULL");

    let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", "1"]);
    assert!(ok, "running init again is fine: {out}");
    let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", "2"]);
    assert!(!ok && out.contains("already node 1"), "{out}");

    db.batch_execute("COMMENT ON COLUMN shop.users.name IS '@accord detla'")
        .await
        .unwrap();
    let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", "1"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("detla") && out.contains("delta"),
        "names the word and the fix: {out}"
    );
    db.batch_execute("COMMENT ON COLUMN shop.users.name IS NULL")
        .await
        .unwrap();

    let (ok, out) = accord(&["review", "list", "--dsn", &dsn]);
    assert!(ok && out.contains("no open review items"), "{out}");
    let (ok, out) = accord(&["review", "resolve", "00000000000000ff", "--dsn", &dsn, "--pick", "1"]);
    assert!(!ok && out.contains("no review item 00000000000000ff"), "{out}");
}
