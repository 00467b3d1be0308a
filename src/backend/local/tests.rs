use std::os::unix::fs::{FileExt, MetadataExt};

use super::image::sparse_copy;
use super::index::{INDEX_FILE, INDEX_TMP};
use super::*;

const MIB: u64 = 1024 * 1024;
const NODE: &str = "node-1";

fn spec(name: &str, capacity_bytes: u64) -> DiskSpec {
    DiskSpec {
        name: name.to_string(),
        capacity_bytes,
        source: None,
        parameters: BTreeMap::new(),
        accessibility: None,
        options: BTreeMap::new(),
        usable_bytes: capacity_bytes.saturating_sub(16 * MIB),
        key_scope: None,
    }
}

fn from(name: &str, capacity_bytes: u64, source: DiskSource) -> DiskSpec {
    DiskSpec {
        source: Some(source),
        ..spec(name, capacity_bytes)
    }
}

fn open(dir: &Path) -> LocalBackend {
    LocalBackend::open(dir, NODE, None).unwrap()
}

fn disk_image(b: &LocalBackend, id: &VolumeId) -> PathBuf {
    b.inner.disk_path(id.disk())
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn blocks(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks()
}

fn on_disk_index(dir: &Path) -> Index {
    serde_json::from_slice(&fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap()
}

fn vid(s: &str) -> VolumeId {
    s.parse().unwrap()
}

#[tokio::test]
async fn create_makes_a_sparse_image_rounded_to_a_mib() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let d = b.create_disk(&spec("pvc-a", 5 * MIB + 1)).await.unwrap();
    assert_eq!(d.capacity_bytes, 6 * MIB);
    assert_eq!(d.name, "pvc-a");
    assert_eq!(d.id.backend(), BackendKind::Local);
    assert_eq!(d.id.location(), NODE);
    assert!(is_stem(DISK_PREFIX, d.id.disk()), "{}", d.id);
    assert_eq!(d.id.disk(), hashed_stem(DISK_PREFIX, "pvc-a"));
    assert!(d.attached_to.is_empty());
    assert_eq!(
        d.topology,
        vec![Topology::from([(
            TOPOLOGY_NODE_KEY.to_string(),
            NODE.to_string()
        )])]
    );
    let path = disk_image(&b, &d.id);
    assert_eq!(
        path,
        dir.path()
            .join("disks")
            .join(format!("{}.img", d.id.disk()))
    );
    assert_eq!(fs::metadata(&path).unwrap().len(), 6 * MIB);
    assert_eq!(blocks(&path), 0, "a new image is all holes");
    assert_eq!(b.get_disk(&d.id).await.unwrap(), Some(d));
}

#[tokio::test]
async fn create_is_idempotent_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let d = b.create_disk(&spec("pvc-a", 3 * MIB)).await.unwrap();
    // Same request, and a request that rounds to the same size.
    assert_eq!(b.create_disk(&spec("pvc-a", 3 * MIB)).await.unwrap(), d);
    assert_eq!(b.create_disk(&spec("pvc-a", 2 * MIB + 7)).await.unwrap(), d);
    // Another size.
    let e = b.create_disk(&spec("pvc-a", 4 * MIB)).await.unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
    // Another source.
    let e = b
        .create_disk(&from("pvc-a", 3 * MIB, DiskSource::Disk(d.id.clone())))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
    // Still one disk; an expansion does not break a retry of the create.
    assert_eq!(b.list_disks(None, 0).await.unwrap().0.len(), 1);
    b.expand(&d.id, 10 * MIB).await.unwrap();
    let again = b.create_disk(&spec("pvc-a", 3 * MIB)).await.unwrap();
    assert_eq!(again.id, d.id);
    assert_eq!(again.capacity_bytes, 10 * MIB);
}

#[tokio::test]
async fn create_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::open(dir.path(), NODE, Some(64 * MIB)).unwrap();
    let e = b.create_disk(&spec("", MIB)).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    let e = b.create_disk(&spec("x", 0)).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    let e = b.create_disk(&spec("x", u64::MAX)).await.unwrap_err();
    assert!(matches!(e, Error::OutOfRange(_)), "{e:?}");
    let e = b.create_disk(&spec("x", 65 * MIB)).await.unwrap_err();
    assert!(matches!(e, Error::OutOfRange(_)), "{e:?}");
    let mut s = spec("x", MIB);
    s.parameters.insert("fsType".into(), "ext4".into());
    let e = b.create_disk(&s).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("\"fsType\"")),
        "{e:?}"
    );
    let mut s = spec("x", MIB);
    s.accessibility = Some(TopologyRequirement {
        requisite: vec![Topology::from([(
            TOPOLOGY_NODE_KEY.to_string(),
            "node-2".to_string(),
        )])],
        preferred: vec![],
    });
    let e = b.create_disk(&s).await.unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
    s.accessibility
        .as_mut()
        .unwrap()
        .requisite
        .push(Topology::from([(
            TOPOLOGY_NODE_KEY.to_string(),
            NODE.to_string(),
        )]));
    b.create_disk(&s).await.unwrap();
    assert_eq!(b.list_disks(None, 0).await.unwrap().0.len(), 1);
}

#[tokio::test]
async fn clone_copies_the_source_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let src = b.create_disk(&spec("src", 8 * MIB)).await.unwrap();
    write_at(&disk_image(&b, &src.id), 0, b"LUKS\xba\xbe header");
    write_at(&disk_image(&b, &src.id), 5 * MIB + 3, b"marker");

    let clone = b
        .create_disk(&from("clone", 16 * MIB, DiskSource::Disk(src.id.clone())))
        .await
        .unwrap();
    assert_eq!(clone.capacity_bytes, 16 * MIB);
    assert_eq!(clone.source, Some(DiskSource::Disk(src.id.clone())));
    let path = disk_image(&b, &clone.id);
    assert_eq!(read_at(&path, 0, 13), b"LUKS\xba\xbe header");
    assert_eq!(read_at(&path, 5 * MIB + 3, 6), b"marker");
    assert_eq!(read_at(&path, 12 * MIB, 4), [0; 4]);

    // Capacity 0: the source's size.
    let same = b
        .create_disk(&from("clone0", 0, DiskSource::Disk(src.id.clone())))
        .await
        .unwrap();
    assert_eq!(same.capacity_bytes, 8 * MIB);

    // Smaller than the source.
    let e = b
        .create_disk(&from("small", 4 * MIB, DiskSource::Disk(src.id.clone())))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::OutOfRange(_)), "{e:?}");
    // Missing source.
    let missing = VolumeId::new(BackendKind::Local, NODE, "disk-nope").unwrap();
    let e = b
        .create_disk(&from("orphan", 8 * MIB, DiskSource::Disk(missing)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    // A source of another location.
    let foreign = vid(&format!("local:node-2:{}", src.id.disk()));
    let e = b
        .create_disk(&from("foreign", 8 * MIB, DiskSource::Disk(foreign)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
}

#[tokio::test]
async fn snapshot_and_restore_copy_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let src = b.create_disk(&spec("src", 8 * MIB)).await.unwrap();
    let src_path = disk_image(&b, &src.id);
    write_at(&src_path, 7 * MIB, b"before");

    let before = now_unix_nanos();
    let snap = b.create_snapshot(&src.id, "snap-a").await.unwrap();
    assert!(snap.ready);
    assert_eq!(snap.source, src.id);
    assert_eq!(snap.size_bytes, 8 * MIB);
    assert!(snap.created_unix_nanos >= before);
    assert!(is_stem(SNAPSHOT_PREFIX, snap.id.snapshot()));

    // The snapshot is a point-in-time copy: later writes do not reach it.
    write_at(&src_path, 7 * MIB, b"after!");
    let restored = b
        .create_disk(&from(
            "restored",
            8 * MIB,
            DiskSource::Snapshot(snap.id.clone()),
        ))
        .await
        .unwrap();
    assert_eq!(
        read_at(&disk_image(&b, &restored.id), 7 * MIB, 6),
        b"before"
    );
    assert_eq!(restored.source, Some(DiskSource::Snapshot(snap.id.clone())));

    // The snapshot outlives its source.
    b.delete_disk(&src.id).await.unwrap();
    let again = b
        .create_disk(&from("restored2", 0, DiskSource::Snapshot(snap.id.clone())))
        .await
        .unwrap();
    assert_eq!(read_at(&disk_image(&b, &again.id), 7 * MIB, 6), b"before");
    assert_eq!(again.capacity_bytes, 8 * MIB);

    // Restore from a snapshot that does not exist.
    let missing = SnapshotId::new(BackendKind::Local, NODE, "snap-nope").unwrap();
    let e = b
        .create_disk(&from("r3", 8 * MIB, DiskSource::Snapshot(missing)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
}

#[tokio::test]
async fn copies_keep_holes() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let src = b.create_disk(&spec("src", 64 * MIB)).await.unwrap();
    let src_path = disk_image(&b, &src.id);
    write_at(&src_path, 0, &[0xa5; 4096]);
    write_at(&src_path, 40 * MIB, &[0x5a; 4096]);
    let src_blocks = blocks(&src_path);
    assert!(src_blocks > 0);

    let clone = b
        .create_disk(&from("clone", 64 * MIB, DiskSource::Disk(src.id.clone())))
        .await
        .unwrap();
    let clone_path = disk_image(&b, &clone.id);
    assert!(
        blocks(&clone_path) <= src_blocks,
        "clone has {} blocks, source {src_blocks}",
        blocks(&clone_path)
    );
    assert!(blocks(&clone_path) * 512 < MIB);
    assert_eq!(read_at(&clone_path, 40 * MIB, 4096), vec![0x5a; 4096]);

    let snap = b.create_snapshot(&src.id, "s").await.unwrap();
    let snap_path = b.inner.snapshot_path(snap.id.snapshot());
    assert!(blocks(&snap_path) <= src_blocks);
    assert_eq!(read_at(&snap_path, 0, 4096), vec![0xa5; 4096]);
}

#[test]
fn sparse_copy_skips_holes_and_zero_blocks() {
    // Exercised directly: on a filesystem with reflinks the backend would not
    // get here.
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src");
    let src = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&src_path)
        .unwrap();
    src.set_len(32 * MIB).unwrap();
    src.write_all_at(b"head", 0).unwrap();
    // Allocated but all zeros: need not be allocated in the copy.
    src.write_all_at(&vec![0u8; 2 * MIB as usize], 8 * MIB)
        .unwrap();
    src.write_all_at(b"tail", 32 * MIB - 4).unwrap();
    src.sync_all().unwrap();

    let dst_path = dir.path().join("dst");
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&dst_path)
        .unwrap();
    dst.set_len(32 * MIB).unwrap();
    sparse_copy(&src, &dst, 32 * MIB).unwrap();
    dst.sync_all().unwrap();

    assert_eq!(read_at(&dst_path, 0, 4), b"head");
    assert_eq!(read_at(&dst_path, 32 * MIB - 4, 4), b"tail");
    assert_eq!(read_at(&dst_path, 9 * MIB, 16), [0; 16]);
    assert!(blocks(&src_path) >= 2 * MIB / 512);
    assert!(
        blocks(&dst_path) * 512 < 256 * 1024,
        "copy has {} blocks",
        blocks(&dst_path)
    );
    // Byte for byte the same.
    assert_eq!(fs::read(&src_path).unwrap(), fs::read(&dst_path).unwrap());
}

#[tokio::test]
async fn delete_is_idempotent_and_refuses_attached_disks() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let missing = VolumeId::new(BackendKind::Local, NODE, "disk-missing").unwrap();
    b.delete_disk(&missing).await.unwrap();

    let d = b.create_disk(&spec("a", MIB)).await.unwrap();
    let path = disk_image(&b, &d.id);
    b.attach(&d.id, "node-1", false).await.unwrap();
    let e = b.delete_disk(&d.id).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    assert!(path.exists());

    b.detach(&d.id, "node-1").await.unwrap();
    b.delete_disk(&d.id).await.unwrap();
    assert!(!path.exists());
    assert_eq!(b.get_disk(&d.id).await.unwrap(), None);
    b.delete_disk(&d.id).await.unwrap();
    assert!(on_disk_index(dir.path()).disks.is_empty());
    // Created again under the same name: a fresh, blank disk.
    let again = b.create_disk(&spec("a", MIB)).await.unwrap();
    assert_eq!(again.id, d.id);
}

#[tokio::test]
async fn list_pages_through_every_disk_in_a_stable_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            b.create_disk(&spec(&format!("pvc-{i}"), MIB))
                .await
                .unwrap()
                .id,
        );
    }
    ids.sort();

    let (all, next) = b.list_disks(None, 0).await.unwrap();
    assert_eq!(next, None);
    assert_eq!(all.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(b.list_disks(None, 7).await.unwrap().1, None);
    assert_eq!(b.list_disks(None, 100).await.unwrap().0.len(), 7);

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let (page, next) = b.list_disks(token.as_deref(), 3).await.unwrap();
        assert!(page.len() <= 3);
        seen.extend(page.into_iter().map(|d| d.id));
        pages += 1;
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    // A token stays valid when its disk is deleted between pages.
    let (first, next) = b.list_disks(None, 2).await.unwrap();
    let next = next.unwrap();
    b.delete_disk(&ids[2]).await.unwrap();
    let (rest, _) = b.list_disks(Some(&next), 0).await.unwrap();
    assert_eq!(first.len() + rest.len(), 6);
    assert_eq!(rest[0].id, ids[3]);

    for bad in [
        "bogus",
        "disk-",
        "disk-XYZ",
        "snap-0123456789abcdef0123456789abcdef",
    ] {
        let e = b.list_disks(Some(bad), 0).await.unwrap_err();
        assert!(matches!(e, Error::Aborted(_)), "{bad}: {e:?}");
    }
    // An empty token is no token.
    assert_eq!(b.list_disks(Some(""), 0).await.unwrap().0.len(), 6);
}

#[tokio::test]
async fn attach_and_detach_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let d = b.create_disk(&spec("a", MIB)).await.unwrap();
    let ctx = b.attach(&d.id, "node-1", false).await.unwrap();
    let path = PathBuf::from(&ctx[PUBLISH_IMAGE_PATH]);
    assert!(path.is_absolute());
    assert_eq!(path, disk_image(&b, &d.id));
    assert_eq!(ctx.len(), 1);
    assert_eq!(b.attach(&d.id, "node-1", false).await.unwrap(), ctx);
    assert_eq!(
        b.get_disk(&d.id).await.unwrap().unwrap().attached_to,
        vec!["node-1".to_string()]
    );
    // Same node, other mode.
    let e = b.attach(&d.id, "node-1", true).await.unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
    // A second node while a writer holds it.
    let e = b.attach(&d.id, "node-2", true).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");

    b.detach(&d.id, "node-1").await.unwrap();
    b.detach(&d.id, "node-1").await.unwrap();
    b.detach(&d.id, "never-attached").await.unwrap();
    assert!(
        b.get_disk(&d.id)
            .await
            .unwrap()
            .unwrap()
            .attached_to
            .is_empty()
    );

    // Many readers, but no writer beside them.
    b.attach(&d.id, "node-1", true).await.unwrap();
    b.attach(&d.id, "node-2", true).await.unwrap();
    let e = b.attach(&d.id, "node-3", false).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    assert_eq!(
        b.get_disk(&d.id).await.unwrap().unwrap().attached_to,
        vec!["node-1".to_string(), "node-2".to_string()]
    );
    assert_eq!(
        on_disk_index(dir.path()).disks[d.id.disk()]
            .attachments
            .len(),
        2
    );

    let missing = VolumeId::new(BackendKind::Local, NODE, "disk-missing").unwrap();
    let e = b.attach(&missing, "node-1", false).await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    b.detach(&missing, "node-1").await.unwrap();
    let e = b.attach(&d.id, "", false).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
}

#[tokio::test]
async fn the_fresh_record_is_set_at_create_absent_on_copies_and_cleared_by_unpublish() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let d = b.create_disk(&spec("pvc-f", 8 * MIB)).await.unwrap();
    let record = d.fresh.clone().expect("an empty disk has a record");
    // In the same index write that recorded the disk, and readable by the node.
    assert_eq!(
        on_disk_index(dir.path()).disks[d.id.disk()].fresh,
        Some(record.clone())
    );
    assert_eq!(
        LocalBackend::fresh_record(dir.path(), d.id.disk()).unwrap(),
        Some(record.clone())
    );
    // A retried create returns the same record.
    let again = b.create_disk(&spec("pvc-f", 8 * MIB)).await.unwrap();
    assert_eq!(again.fresh, Some(record.clone()));
    // Copies have none; one put there by hand is not believed.
    let clone = b
        .create_disk(&from("pvc-c", 8 * MIB, DiskSource::Disk(d.id.clone())))
        .await
        .unwrap();
    let snap = b.create_snapshot(&d.id, "snap-f").await.unwrap();
    let restore = b
        .create_disk(&from("pvc-r", 8 * MIB, DiskSource::Snapshot(snap.id)))
        .await
        .unwrap();
    for copy in [&clone, &restore] {
        assert_eq!(copy.fresh, None);
        assert_eq!(
            LocalBackend::fresh_record(dir.path(), copy.id.disk()).unwrap(),
            None
        );
    }
    {
        let mut index = b.inner.index.lock().await;
        index.disks.get_mut(clone.id.disk()).unwrap().fresh = Some(record.clone());
    }
    assert_eq!(b.get_disk(&clone.id).await.unwrap().unwrap().fresh, None);
    // A plain detach keeps it; ending the attachment clears it with the detach.
    b.attach(&d.id, NODE, false).await.unwrap();
    b.detach(&d.id, NODE).await.unwrap();
    assert_eq!(
        b.get_disk(&d.id).await.unwrap().unwrap().fresh,
        Some(record)
    );
    b.attach(&d.id, NODE, false).await.unwrap();
    b.detach_ending_fresh(&d.id, NODE).await.unwrap();
    let now = b.get_disk(&d.id).await.unwrap().unwrap();
    assert_eq!((now.fresh, now.attached_to.len()), (None, 0));
    assert_eq!(on_disk_index(dir.path()).disks[d.id.disk()].fresh, None);
    assert_eq!(
        LocalBackend::fresh_record(dir.path(), d.id.disk()).unwrap(),
        None
    );
    // Idempotent, and for a disk that is gone.
    b.detach_ending_fresh(&d.id, NODE).await.unwrap();
    b.delete_disk(&d.id).await.unwrap();
    b.detach_ending_fresh(&d.id, NODE).await.unwrap();
    assert_eq!(
        LocalBackend::fresh_record(dir.path(), d.id.disk()).unwrap(),
        None
    );
}

#[tokio::test]
async fn expand_grows_only() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::open(dir.path(), NODE, Some(100 * MIB)).unwrap();
    let d = b.create_disk(&spec("a", 4 * MIB)).await.unwrap();
    write_at(&disk_image(&b, &d.id), MIB, b"keep");
    assert_eq!(b.expand(&d.id, 9 * MIB + 1).await.unwrap(), 10 * MIB);
    assert_eq!(fs::metadata(disk_image(&b, &d.id)).unwrap().len(), 10 * MIB);
    assert_eq!(read_at(&disk_image(&b, &d.id), MIB, 4), b"keep");
    // Again, and a request that rounds to the same size.
    assert_eq!(b.expand(&d.id, 10 * MIB).await.unwrap(), 10 * MIB);
    assert_eq!(b.expand(&d.id, 9 * MIB + 5).await.unwrap(), 10 * MIB);
    let e = b.expand(&d.id, 4 * MIB).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    let e = b.expand(&d.id, 101 * MIB).await.unwrap_err();
    assert!(matches!(e, Error::OutOfRange(_)), "{e:?}");
    let other = b.create_disk(&spec("b", 80 * MIB)).await.unwrap();
    let e = b.expand(&d.id, 30 * MIB).await.unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
    assert_eq!(
        b.get_disk(&d.id).await.unwrap().unwrap().capacity_bytes,
        10 * MIB
    );
    assert_eq!(
        on_disk_index(dir.path()).disks[d.id.disk()].capacity_bytes,
        10 * MIB
    );
    b.delete_disk(&other.id).await.unwrap();
    let missing = VolumeId::new(BackendKind::Local, NODE, "disk-missing").unwrap();
    let e = b.expand(&missing, 30 * MIB).await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
}

#[tokio::test]
async fn capacity_is_bounded_by_the_limit_and_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let none = BTreeMap::new();
    let st = nix::sys::statvfs::statvfs(dir.path()).unwrap();
    let fs_free = st.blocks_available() as u64 * st.fragment_size() as u64;
    {
        let unlimited = open(dir.path());
        let c = unlimited.capacity(&none, None).await.unwrap();
        // Free space moves under our feet; roughly the filesystem's.
        assert!(c > fs_free / 2 && c < fs_free * 2, "{c} vs {fs_free}");
        assert_eq!(unlimited.max_volume_bytes(), None);
    }

    let b = LocalBackend::open(dir.path(), NODE, Some(50 * MIB)).unwrap();
    assert_eq!(b.max_volume_bytes(), Some(50 * MIB));
    assert_eq!(b.capacity(&none, None).await.unwrap(), 50 * MIB);
    let d = b.create_disk(&spec("a", 20 * MIB)).await.unwrap();
    assert_eq!(b.capacity(&none, None).await.unwrap(), 30 * MIB);
    b.create_snapshot(&d.id, "s").await.unwrap();
    assert_eq!(b.capacity(&none, None).await.unwrap(), 10 * MIB);
    let e = b.create_disk(&spec("b", 11 * MIB)).await.unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
    let e = b.create_snapshot(&d.id, "s2").await.unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
    b.create_disk(&spec("b", 10 * MIB)).await.unwrap();
    assert_eq!(b.capacity(&none, None).await.unwrap(), 0);

    let here = Topology::from([(TOPOLOGY_NODE_KEY.to_string(), NODE.to_string())]);
    let there = Topology::from([(TOPOLOGY_NODE_KEY.to_string(), "node-2".to_string())]);
    b.delete_disk(&d.id).await.unwrap();
    assert_eq!(b.capacity(&none, Some(&here)).await.unwrap(), 20 * MIB);
    assert_eq!(b.capacity(&none, Some(&there)).await.unwrap(), 0);
    assert_eq!(b.accessible_topology(), vec![here]);
    let params = BTreeMap::from([("type".to_string(), "ssd".to_string())]);
    let e = b.capacity(&params, None).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
}

#[test]
fn parameters_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    assert_eq!(b.kind(), BackendKind::Local);
    b.validate_parameters(&BTreeMap::new()).unwrap();
    let params = BTreeMap::from([
        ("skuName".to_string(), "x".to_string()),
        ("evil\nkey".to_string(), "y".to_string()),
    ]);
    let Error::InvalidArgument(m) = b.validate_parameters(&params).unwrap_err() else {
        panic!("wrong error")
    };
    assert!(m.contains("\"skuName\""), "{m}");
    assert!(m.contains("evil\\u{a}key"), "{m}");
    assert!(!m.contains('\n'));
}

#[tokio::test]
async fn foreign_ids_are_refused_and_filter_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let d = b.create_disk(&spec("a", MIB)).await.unwrap();
    let snap = b.create_snapshot(&d.id, "s").await.unwrap();
    for foreign in [
        format!("azure:{NODE}:{}", d.id.disk()),
        format!("local:node-2:{}", d.id.disk()),
    ] {
        let id = vid(&foreign);
        let inv = |e: Error| assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        inv(b.get_disk(&id).await.unwrap_err());
        inv(b.delete_disk(&id).await.unwrap_err());
        inv(b.attach(&id, "n", false).await.unwrap_err());
        inv(b.detach(&id, "n").await.unwrap_err());
        inv(b.expand(&id, MIB).await.unwrap_err());
        inv(b.create_snapshot(&id, "t").await.unwrap_err());
        let (snaps, _) = b.list_snapshots(Some(&id), None, None, 0).await.unwrap();
        assert!(snaps.is_empty());
        let sid: SnapshotId = foreign
            .replace(d.id.disk(), snap.id.snapshot())
            .parse()
            .unwrap();
        inv(b.get_snapshot(&sid).await.unwrap_err());
        inv(b.delete_snapshot(&sid).await.unwrap_err());
        let (snaps, _) = b.list_snapshots(None, Some(&sid), None, 0).await.unwrap();
        assert!(snaps.is_empty());
    }
    assert!(b.get_disk(&d.id).await.unwrap().is_some());
}

#[tokio::test]
async fn snapshots_are_idempotent_listed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let a = b.create_disk(&spec("a", MIB)).await.unwrap();
    let c = b.create_disk(&spec("c", 2 * MIB)).await.unwrap();
    let s1 = b.create_snapshot(&a.id, "s1").await.unwrap();
    assert_eq!(b.create_snapshot(&a.id, "s1").await.unwrap(), s1);
    let e = b.create_snapshot(&c.id, "s1").await.unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
    let missing = VolumeId::new(BackendKind::Local, NODE, "disk-missing").unwrap();
    let e = b.create_snapshot(&missing, "s9").await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    let e = b.create_snapshot(&a.id, "").await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");

    let s2 = b.create_snapshot(&a.id, "s2").await.unwrap();
    let s3 = b.create_snapshot(&c.id, "s3").await.unwrap();
    assert_eq!(s3.size_bytes, 2 * MIB);
    assert_eq!(b.get_snapshot(&s2.id).await.unwrap(), Some(s2.clone()));

    let (all, next) = b.list_snapshots(None, None, None, 0).await.unwrap();
    assert_eq!(next, None);
    let mut want = vec![s1.id.clone(), s2.id.clone(), s3.id.clone()];
    want.sort();
    assert_eq!(all.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), want);

    let (of_a, _) = b.list_snapshots(Some(&a.id), None, None, 0).await.unwrap();
    let mut of_a: Vec<_> = of_a.into_iter().map(|s| s.id).collect();
    of_a.sort();
    let mut want_a = vec![s1.id.clone(), s2.id.clone()];
    want_a.sort();
    assert_eq!(of_a, want_a);
    let (only, _) = b.list_snapshots(None, Some(&s3.id), None, 0).await.unwrap();
    assert_eq!(only, vec![s3.clone()]);
    let (none, _) = b
        .list_snapshots(Some(&a.id), Some(&s3.id), None, 0)
        .await
        .unwrap();
    assert!(none.is_empty());

    let (p1, t1) = b.list_snapshots(None, None, None, 2).await.unwrap();
    let (p2, t2) = b
        .list_snapshots(None, None, t1.as_deref(), 2)
        .await
        .unwrap();
    assert_eq!((p1.len(), p2.len(), t2), (2, 1, None));
    let e = b
        .list_snapshots(None, None, Some("disk-0123456789abcdef0123456789abcdef"), 0)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Aborted(_)), "{e:?}");

    b.delete_snapshot(&s1.id).await.unwrap();
    b.delete_snapshot(&s1.id).await.unwrap();
    assert_eq!(b.get_snapshot(&s1.id).await.unwrap(), None);
    assert!(!b.inner.snapshot_path(s1.id.snapshot()).exists());
    assert_eq!(on_disk_index(dir.path()).snapshots.len(), 2);
}

#[tokio::test]
async fn the_index_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = {
        let b = open(dir.path());
        let d = b.create_disk(&spec("a", 2 * MIB)).await.unwrap();
        b.attach(&d.id, "node-1", false).await.unwrap();
        let s = b.create_snapshot(&d.id, "s").await.unwrap();
        // While this one holds the directory, no other may open it.
        let e = LocalBackend::open(dir.path(), NODE, None).err().unwrap();
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        (b.get_disk(&d.id).await.unwrap().unwrap(), s)
    };
    let b = open(dir.path());
    assert_eq!(b.get_disk(&d.id).await.unwrap(), Some(d.clone()));
    assert_eq!(b.get_snapshot(&s.id).await.unwrap(), Some(s));
    assert_eq!(b.list_disks(None, 0).await.unwrap().0, vec![d.clone()]);
    assert_eq!(b.create_disk(&spec("a", 2 * MIB)).await.unwrap(), d);
    drop(b);

    let e = LocalBackend::open(dir.path(), "node-2", None)
        .err()
        .unwrap();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    let e = LocalBackend::open(dir.path(), "../x", None).err().unwrap();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
}

#[tokio::test]
async fn an_interrupted_index_write_does_not_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let d = {
        let b = open(dir.path());
        b.create_disk(&spec("a", MIB)).await.unwrap()
    };
    let good = fs::read(dir.path().join(INDEX_FILE)).unwrap();
    // A write that died before its rename leaves a torn temporary file.
    fs::write(
        dir.path().join(INDEX_TMP),
        b"{\"version\": 1, \"disks\": {\"di",
    )
    .unwrap();
    // And an image build that died leaves a partial image.
    let partial = dir.path().join("disks").join(".disk-x.img.partial-123");
    fs::write(&partial, b"half").unwrap();

    let b = open(dir.path());
    assert!(!dir.path().join(INDEX_TMP).exists());
    assert!(!partial.exists());
    assert_eq!(fs::read(dir.path().join(INDEX_FILE)).unwrap(), good);
    assert_eq!(b.get_disk(&d.id).await.unwrap().unwrap().id, d.id);
    b.create_disk(&spec("b", MIB)).await.unwrap();
    drop(b);
    let b = open(dir.path());
    assert_eq!(b.list_disks(None, 0).await.unwrap().0.len(), 2);
    drop(b);

    // An index naming files outside the layout is refused.
    let mut tampered: Index = serde_json::from_slice(&good).unwrap();
    let entry = tampered.disks.values().next().unwrap().clone();
    tampered.disks.insert("../../etc/passwd".into(), entry);
    fs::write(
        dir.path().join(INDEX_FILE),
        serde_json::to_vec(&tampered).unwrap(),
    )
    .unwrap();
    let e = LocalBackend::open(dir.path(), NODE, None).err().unwrap();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");

    // A torn index.json itself is refused, not replaced by an empty one.
    fs::write(dir.path().join(INDEX_FILE), &good[..good.len() / 2]).unwrap();
    let e = LocalBackend::open(dir.path(), NODE, None).err().unwrap();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
}

#[tokio::test]
async fn the_files_win_over_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let d = b.create_disk(&spec("a", 2 * MIB)).await.unwrap();
    let keep = b.create_disk(&spec("keep", MIB)).await.unwrap();
    let s = b.create_snapshot(&keep.id, "s").await.unwrap();
    fs::remove_file(disk_image(&b, &d.id)).unwrap();
    fs::remove_file(b.inner.snapshot_path(s.id.snapshot())).unwrap();
    assert_eq!(b.get_disk(&d.id).await.unwrap(), None);
    assert_eq!(b.get_snapshot(&s.id).await.unwrap(), None);
    assert_eq!(b.list_disks(None, 0).await.unwrap().0, vec![keep.clone()]);
    assert!(
        b.list_snapshots(None, None, None, 0)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    let e = b.attach(&d.id, "n", false).await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    // A size changed behind the index's back.
    fs::OpenOptions::new()
        .write(true)
        .open(disk_image(&b, &keep.id))
        .unwrap()
        .set_len(3 * MIB)
        .unwrap();
    assert_eq!(
        b.get_disk(&keep.id).await.unwrap().unwrap().capacity_bytes,
        3 * MIB
    );
    drop(b);

    let b = open(dir.path());
    let index = on_disk_index(dir.path());
    assert!(!index.disks.contains_key(d.id.disk()));
    assert!(index.snapshots.is_empty());
    assert_eq!(index.disks[keep.id.disk()].capacity_bytes, 3 * MIB);
    // Created again: a new image.
    let again = b.create_disk(&spec("a", 2 * MIB)).await.unwrap();
    assert_eq!(again.id, d.id);
    assert!(disk_image(&b, &d.id).exists());
}

#[tokio::test]
async fn an_orphan_image_is_replaced_by_a_retried_create() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    // A crash after the image was renamed into place, before the index
    // write: the image exists, the index does not know it.
    let stem = hashed_stem(DISK_PREFIX, "pvc-crashed");
    let orphan = b.inner.disk_path(&stem);
    fs::write(&orphan, vec![0x77u8; 3 * MIB as usize]).unwrap();
    assert_eq!(b.get_disk(&b.inner.volume_id(&stem)).await.unwrap(), None);
    assert!(b.list_disks(None, 0).await.unwrap().0.is_empty());
    // A delete of it leaves it alone (it is not in the index).
    b.delete_disk(&b.inner.volume_id(&stem)).await.unwrap();
    assert!(orphan.exists());

    let d = b.create_disk(&spec("pvc-crashed", 2 * MIB)).await.unwrap();
    assert_eq!(d.id.disk(), stem);
    assert_eq!(d.capacity_bytes, 2 * MIB);
    assert_eq!(read_at(&orphan, 0, 4), [0; 4], "the orphan was replaced");
    assert_eq!(blocks(&orphan), 0);
}

#[tokio::test]
async fn operations_on_a_busy_name_are_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let stem = hashed_stem(DISK_PREFIX, "pvc-busy");
    let guard = b.inner.mark_busy(&stem, MIB, "test").unwrap();
    let e = b.create_disk(&spec("pvc-busy", MIB)).await.unwrap_err();
    assert!(matches!(e, Error::Aborted(_)), "{e:?}");
    let e = b.delete_disk(&b.inner.volume_id(&stem)).await.unwrap_err();
    assert!(matches!(e, Error::Aborted(_)), "{e:?}");
    drop(guard);
    b.create_disk(&spec("pvc-busy", MIB)).await.unwrap();
    assert!(b.inner.busy.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_all_land_in_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(open(dir.path()));
    let src = b.create_disk(&spec("src", 4 * MIB)).await.unwrap();
    write_at(&disk_image(&b, &src.id), 0, b"shared");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let b = b.clone();
        let src = src.id.clone();
        tasks.push(tokio::spawn(async move {
            let s = if i % 2 == 0 {
                spec(&format!("pvc-{i}"), (i + 1) * MIB)
            } else {
                from(&format!("pvc-{i}"), 4 * MIB, DiskSource::Disk(src))
            };
            b.create_disk(&s).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap().id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    let index = on_disk_index(dir.path());
    assert_eq!(index.disks.len(), 21);
    for id in &ids {
        assert!(index.disks.contains_key(id.disk()));
    }
    assert!(b.inner.busy.lock().unwrap().is_empty());
    drop(b);
    let b = open(dir.path());
    assert_eq!(b.list_disks(None, 0).await.unwrap().0.len(), 21);
}

#[tokio::test]
async fn a_cancelled_create_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    // Drop the future after its first poll.
    let s = spec("pvc-cancelled", MIB);
    let fut = b.create_disk(&s);
    let _ = tokio::time::timeout(std::time::Duration::from_nanos(1), fut).await;
    // The retry either finds it done or finds it in progress; never half done.
    let mut tries = 0;
    let d = loop {
        match b.create_disk(&spec("pvc-cancelled", MIB)).await {
            Ok(d) => break d,
            Err(Error::Aborted(_)) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(d.capacity_bytes, MIB);
    assert_eq!(on_disk_index(dir.path()).disks.len(), 1);
}
