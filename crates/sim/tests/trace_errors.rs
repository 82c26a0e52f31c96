//! Bad trace input is a clear error naming the file and the line.

use std::io::Write;

use fastmig_sim::{SimError, Trace};

fn write(dir: &std::path::Path, name: &str, lines: &[&str]) {
    let mut f = std::fs::File::create(dir.join(name)).expect("create");
    for l in lines {
        writeln!(f, "{l}").expect("write");
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fastmig-sim-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

#[test]
fn missing_directory_is_an_io_error_naming_it() {
    let e = Trace::load(std::path::Path::new("/nonexistent/fastmig/day")).expect_err("must fail");
    assert!(matches!(e, SimError::TraceIo { .. }));
    assert!(e.to_string().contains("/nonexistent/fastmig/day"));
}

#[test]
fn short_file_and_non_number_name_file_and_line() {
    let d = temp_dir("short");
    let full: Vec<String> = (0..288).map(|i| (i % 100).to_string()).collect();
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    write(&d, "a vm with spaces", &full);
    write(&d, "b", &full[..100]);
    let e = Trace::load(&d).expect_err("short");
    let msg = e.to_string();
    assert!(
        msg.contains("/b:101") && msg.contains("short file"),
        "{msg}"
    );

    let mut bad = full.clone();
    bad[6] = "7x";
    write(&d, "b", &bad);
    let msg = Trace::load(&d).expect_err("nan").to_string();
    assert!(
        msg.contains("/b:7") && msg.contains("not a number"),
        "{msg}"
    );

    write(&d, "b", &full);
    let t = Trace::load(&d).expect("good");
    // Sorted by name: "a vm with spaces" before "b".
    assert_eq!(
        t.names,
        vec!["a vm with spaces".to_string(), "b".to_string()]
    );
    assert_eq!(t.sample_count(), 288);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn csv_trace_with_header_and_ragged_row() {
    let d = temp_dir("csv");
    let p = d.join("t.csv");
    std::fs::write(&p, "vm,s0,s1,s2\n# comment\nweb,10,20,30\ndb,5,5.5,6\n").expect("write");
    let t = Trace::load(&p).expect("csv");
    assert_eq!(t.len(), 2);
    assert!((t.utilization(1, 300.0) - 0.055).abs() < 1e-12);
    std::fs::write(&p, "web,10,20,30\ndb,5,5\n").expect("write");
    let msg = Trace::load(&p).expect_err("ragged").to_string();
    assert!(msg.contains("t.csv:2"), "{msg}");
    let _ = std::fs::remove_dir_all(&d);
}
