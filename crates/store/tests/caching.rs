//! `CachingStore`: hubs and policies are read from the store once, and every change made through
//! it is seen by the next read. A `FaultyStore` underneath shows whether a read reached the
//! store: with reads failing there, only a read served from memory succeeds.

use std::sync::Arc;

use fleetgate_core::policy::default_dps_policies;
use fleetgate_store::{CachingStore, Faults, FaultyStore, HubAllocation, InstanceStore, LinkedHub, SqliteStore};

mod common;
use common::TempPath;

fn stores() -> (CachingStore, Faults, TempPath) {
    let db = TempPath::file("fleetgate.db");
    let faults = Faults::default();
    let inner = Arc::new(FaultyStore::new(Arc::new(SqliteStore::open(&db).unwrap()), faults.clone()));
    (CachingStore::new(inner), faults, db)
}

#[tokio::test]
async fn hubs_are_read_once_and_reloaded_after_each_change() {
    let (store, faults, _db) = stores();
    store.add_hub(&LinkedHub::new("a.example", "k1")).await.unwrap();
    assert_eq!(store.hubs().await.unwrap().len(), 1);

    faults.fail_reads(true);
    for _ in 0..3 {
        assert_eq!(store.hubs().await.unwrap()[0].host_name, "a.example", "served from memory");
    }
    faults.fail_reads(false);

    // Each kind of change drops the copy: the next read goes to the store and sees it.
    store.add_hub(&LinkedHub::new("b.example", "k2")).await.unwrap();
    faults.fail_reads(true);
    assert!(store.hubs().await.is_err(), "an added hub must be read from the store");
    faults.fail_reads(false);
    assert_eq!(store.hubs().await.unwrap().len(), 2);

    let weight = HubAllocation { allocation_weight: 7, ..HubAllocation::default() };
    assert!(store.set_hub_allocation("b.example", &weight).await.unwrap());
    let b = store.hubs().await.unwrap().into_iter().find(|h| h.host_name == "b.example").unwrap();
    assert_eq!(b.allocation.allocation_weight, 7);

    store.remove_hub("b.example").await.unwrap();
    assert_eq!(store.hubs().await.unwrap().len(), 1);
}

#[tokio::test]
async fn policies_are_read_once_and_reloaded_after_each_change() {
    let (store, faults, _db) = stores();
    let mut policies = default_dps_policies();
    store.set_policies("dps", &policies).await.unwrap();
    assert_eq!(store.policies("dps").await.unwrap(), policies);

    faults.fail_reads(true);
    assert_eq!(store.policies("DPS").await.unwrap(), policies, "served from memory, any case");
    // An owner without policies is not remembered (owners come from requests).
    assert!(store.policies("hub:nothing.example").await.is_err());
    faults.fail_reads(false);

    policies[0].primary_key = "renewed".into();
    store.set_policies("dps", &policies).await.unwrap();
    assert_eq!(store.policies("dps").await.unwrap()[0].primary_key, "renewed");
}
