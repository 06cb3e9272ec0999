//! The Redis adapter's pure parts.

use super::*;

#[test]
fn an_incarnation_names_its_instance_and_other_owners_name_none() {
    let incarnation = LeaseHolder {
        owner: LeaseHolder::incarnation("chunkstream-0", 0x1_0000_0abc),
        ttl: Duration::from_secs(30),
    };
    assert_eq!(incarnation.owner, "chunkstream-0#00000abc");
    assert_eq!(incarnation.instance(), Some("chunkstream-0"));
    assert_eq!(incarnation.incarnation_prefix(), "chunkstream-0#");
    let fresh = LeaseHolder {
        owner: "host-12-abcdef".into(),
        ..incarnation
    };
    assert_eq!(fresh.instance(), None);
    assert_eq!(fresh.incarnation_prefix(), "");
}
