//! The documentation names every error code the api can answer with: the README's list and the
//! OpenAPI document's `Error.code` enum, read against the codes the sources can produce.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The string literals that follow each occurrence of `marker` in `text`.
fn literals_after(text: &str, marker: &str) -> Vec<String> {
    text.match_indices(marker)
        .filter_map(|(at, _)| text[at + marker.len()..].split_once('"').map(|(code, _)| code.to_owned()))
        .collect()
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// Every code an error body can carry: the fixed ones of `ApiError::code` and those handlers pass to
/// `ApiError::bad_request` or `ApiError::Conflict`.
fn error_codes_in_sources(root: &Path) -> BTreeSet<String> {
    let error_rs = std::fs::read_to_string(root.join("api/src/http/error.rs")).unwrap();
    let start = error_rs.find("fn code(&self)").expect("ApiError::code");
    let end = start + error_rs[start..].find("\n    }\n").expect("end of ApiError::code");
    let mut codes: BTreeSet<String> = literals_after(&error_rs[start..end], "=> \"").into_iter().collect();
    let mut files = Vec::new();
    rust_files(&root.join("api/src"), &mut files);
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        codes.extend(literals_after(&source, "bad_request(\""));
        codes.extend(literals_after(&source, "Conflict { code: \""));
    }
    codes
}

#[test]
fn every_error_code_is_in_the_readme_and_the_openapi_document() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let codes = error_codes_in_sources(&root);
    // The parser must have found the fixed codes and the handlers' ones, or this test proves nothing.
    for known in ["internal_error", "invalid_json", "email_taken", "body_read_failed"] {
        assert!(codes.contains(known), "the source scan missed {known}: {codes:?}");
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let openapi: serde_json::Value = serde_json::from_str(api::OPENAPI_DOCUMENT).unwrap();
    let documented: BTreeSet<String> = openapi["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
        .as_array()
        .expect("Error.code has an enum")
        .iter()
        .map(|code| code.as_str().unwrap().to_owned())
        .collect();
    for code in &codes {
        assert!(readme.contains(&format!("`{code}`")), "README does not name the error code {code}");
    }
    assert_eq!(documented, codes, "the OpenAPI Error.code enum differs from the codes the api produces");
}
