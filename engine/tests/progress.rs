//! Progress of long engine calls on the private libvirtd daemons (`scripts/libvirt-nodes.sh
//! up`, then source its env file; `--ignored`): a volume copy reports how much it has
//! written while `virStorageVolCreateXMLFrom` still runs. (A migration's progress is tested
//! through the command line, `controller/tests/progress_real.rs`.)

use std::io::Write;
use std::time::Duration;

use virtkube_engine::model::{PoolDef, VolumeDef, VolumeFormat};
use virtkube_engine::{Engine, EngineConfig, Owner};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the private libvirtd daemons"]
async fn a_volume_copy_reports_the_bytes_written_while_it_runs() {
    let uri = std::env::var("VIRTKUBE_TEST_NODE_A_URI")
        .expect("VIRTKUBE_TEST_NODE_A_URI: run scripts/libvirt-nodes.sh up and source its env");
    let e = Engine::connect(&uri, EngineConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pool = format!("xcopy{}", std::process::id());
    let po = Owner::new("StoragePool", format!("uid-{pool}"), None, &pool);
    e.pool_define(&PoolDef::dir(
        &pool,
        dir.path().to_str().unwrap(),
        po.clone(),
    ))
    .await
    .unwrap();
    e.pool_start(&pool, &po).await.unwrap();
    let source = VolumeDef {
        name: "x.source".into(),
        capacity_bytes: 1 << 30,
        format: VolumeFormat::Raw,
        backing_volume: None,
    };
    let src = e.volume_create(&pool, &source).await.unwrap();
    // 768 MiB of data that does not compress away, written into the raw image.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src.path)
            .unwrap();
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..768 {
            for b in block.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = (state >> 32) as u8;
            }
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    e.pool_refresh(&pool, &po).await.unwrap();
    let copy = VolumeDef {
        name: "x.copy".into(),
        capacity_bytes: 1 << 30,
        format: VolumeFormat::Qcow2,
        backing_volume: None,
    };
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let readings = tokio::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            if let Some(p) = *rx.borrow_and_update() {
                seen.push(p);
            }
        }
        seen
    });
    let done = e
        .volume_clone_with_progress(&pool, &copy, "x.source", Duration::from_millis(50), &tx)
        .await
        .unwrap();
    drop(tx);
    let seen = readings.await.unwrap();
    let total = seen
        .first()
        .and_then(|p| p.total)
        .expect("the source's size is known");
    assert!(total >= 768 << 20, "{seen:?}");
    let partial: Vec<u64> = seen
        .iter()
        .map(|p| p.written)
        .filter(|w| *w > 0 && *w < total)
        .collect();
    assert!(
        !partial.is_empty(),
        "a reading while the copy ran: {seen:?}"
    );
    assert!(partial.windows(2).all(|w| w[1] >= w[0]), "{partial:?}");
    assert!(done.allocation >= total / 2, "{done:?}");
    e.volume_delete(&pool, "x.copy", &done.key).await.unwrap();
    e.volume_delete(&pool, "x.source", &src.key).await.unwrap();
    e.pool_stop(&pool, &po).await.unwrap();
    e.pool_undefine(&pool, &po).await.unwrap();
    e.close().await.unwrap();
}
