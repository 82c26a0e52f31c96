//! The live controller against `crates/cluster/openapi.json`: every path and method of the
//! file answers with a status the file documents, and its body has the fields the file
//! marks required (following `$ref`s, objects and arrays).

mod controller_common;

use serde_json::Value;

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))
        .expect("openapi.json");
    serde_json::from_str(&text).expect("openapi.json is JSON")
}

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/").expect("local ref");
            &spec["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Checks `v` against `schema`'s types and required fields; returns the problems found.
fn check(spec: &Value, schema: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if v.is_null() && schema["nullable"] == true {
        return;
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                out.push(format!("{at}: expected an object, got {v}"));
                return;
            };
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().expect("field name");
                if !obj.contains_key(r) {
                    out.push(format!("{at}: required field {r} missing"));
                }
            }
            if let Some(props) = schema["properties"].as_object() {
                for (k, s) in props {
                    if let Some(x) = obj.get(k) {
                        check(spec, s, x, &format!("{at}.{k}"), out);
                    }
                }
            }
        }
        Some("array") => match v.as_array() {
            Some(items) => {
                for (i, x) in items.iter().enumerate() {
                    check(spec, &schema["items"], x, &format!("{at}[{i}]"), out);
                }
            }
            None => out.push(format!("{at}: expected an array, got {v}")),
        },
        Some("string") if !v.is_string() => out.push(format!("{at}: expected a string")),
        Some("integer") if !(v.is_i64() || v.is_u64()) => {
            out.push(format!("{at}: expected an integer, got {v}"))
        }
        Some("number") if !v.is_number() => out.push(format!("{at}: expected a number")),
        Some("boolean") if !v.is_boolean() => out.push(format!("{at}: expected a boolean")),
        _ => {}
    }
    if let (Some(e), Some(s)) = (schema["enum"].as_array(), v.as_str()) {
        if !e.iter().any(|x| x == s) {
            out.push(format!("{at}: {s:?} is not one of {e:?}"));
        }
    }
}

#[test]
fn the_live_server_matches_its_openapi_file() {
    let spec = spec();
    let s = controller_common::start();
    // The example order moves v3 to d: the fixture leaves d in standby, and the calls below
    // put it into standby (again) and then wake it before the order.
    assert!(s.hosts_in("standby").contains(&"d".to_owned()));
    let mut problems = Vec::new();
    let mut answered = 0;
    // Reads first, then orders, in the file's order.
    let paths = spec["paths"].as_object().expect("paths");
    let mut calls: Vec<(String, String, &Value)> = Vec::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            calls.push((method.to_uppercase(), path.clone(), op));
        }
    }
    calls.sort_by_key(|c| (c.0 != "GET", c.1 == "/migrations", c.1.ends_with("/wake")));
    for (method, path, op) in calls {
        let url = path.replace("{id}", "d");
        let body = op["requestBody"]["content"]["application/json"]["example"].to_string();
        let body = (method == "POST" && op.get("requestBody").is_some()).then_some(body);
        let (code, json) = s.call(&method, &url, body.as_deref());
        answered += 1;
        let Some(doc) = op["responses"].get(code.to_string()) else {
            problems.push(format!(
                "{method} {path}: status {code} not documented ({json})"
            ));
            continue;
        };
        let schema = &doc["content"]["application/json"]["schema"];
        check(
            &spec,
            schema,
            &json,
            &format!("{method} {path}"),
            &mut problems,
        );
        if !(200..300).contains(&code) {
            problems.push(format!(
                "{method} {path}: the example was refused: {code} {json}"
            ));
        }
        // Without a token every operation answers the documented 401.
        let (code, json) = s.call_with(&method, &url, body.as_deref(), None);
        match op["responses"].get(code.to_string()) {
            Some(doc) if code == 401 => check(
                &spec,
                &doc["content"]["application/json"]["schema"],
                &json,
                &format!("{method} {path} (401)"),
                &mut problems,
            ),
            _ => problems.push(format!(
                "{method} {path} without token: {code} undocumented"
            )),
        }
    }
    assert_eq!(answered, 8, "every path and method of the file was called");
    assert!(problems.is_empty(), "{problems:#?}");
}
