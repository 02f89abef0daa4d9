//! Rebuilds the api when a migration changes, since `embed_migrations!` reads them at compile time.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
