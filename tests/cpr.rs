mod common;
use common::guest::counting_guest;

#[test]
#[ignore]
fn export_counting_guest() {
    let out = std::env::var("MOLT_GUEST_OUT").expect("MOLT_GUEST_OUT");
    std::fs::write(out, counting_guest()).unwrap();
}
