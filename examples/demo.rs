//! The demo that `hack/demo` runs inside the VM: talks to a running
//! `cryptdisk-csi dev` over its unix socket, then takes a blank disk through a
//! LUKS2 round trip with real dm-crypt, printing how long each step took.

use std::fs::{File, OpenOptions as FileOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use cryptdisk_csi::client;
use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::crypt::{self, FormatOptions, Integrity, KeyId, MapperName, OpenOptions, Token};
use cryptdisk_csi::kms::server::MasterSecret;
use cryptdisk_csi::proto::csi::identity_client::IdentityClient;
use cryptdisk_csi::proto::csi::{GetPluginInfoRequest, ProbeRequest};

#[derive(Parser)]
struct Args {
    /// The running driver's endpoint.
    #[arg(long)]
    endpoint: Endpoint,
    /// A blank block device to encrypt (it is formatted).
    #[arg(long)]
    disk: PathBuf,
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Steps {
    started: Instant,
    rows: Vec<(String, Duration)>,
}

impl Steps {
    async fn run<T>(
        &mut self,
        name: &str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let t = Instant::now();
        let out = f.await?;
        let took = t.elapsed();
        println!("demo: {name:<58} {:>8.1} ms", took.as_secs_f64() * 1e3);
        self.rows.push((name.to_string(), took));
        Ok(out)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut steps = Steps {
        started: Instant::now(),
        rows: Vec::new(),
    };

    let channel = steps
        .run("connect to the driver", async {
            Ok(client::connect(&args.endpoint, Duration::from_secs(10)).await?)
        })
        .await?;
    let mut identity = IdentityClient::new(channel);
    let info = steps
        .run("Identity.GetPluginInfo", async {
            Ok(identity
                .get_plugin_info(GetPluginInfoRequest {})
                .await?
                .into_inner())
        })
        .await?;
    println!(
        "demo:   driver {} version {}",
        info.name, info.vendor_version
    );
    let ready = steps
        .run("Identity.Probe", async {
            Ok(identity.probe(ProbeRequest {}).await?.into_inner().ready)
        })
        .await?;
    println!("demo:   ready: {ready:?}");

    let master = MasterSecret::generate();
    let key_id = KeyId::new_random();
    let key = master.derive(key_id.as_str(), 32)?;
    let disk = args.disk.clone();
    steps
        .run("check the disk is blank, format LUKS2", async {
            let blank = crypt::probe_blank(&disk)?;
            let opts = FormatOptions {
                key_id: key_id.clone(),
                token: Token {
                    key_id: key_id.to_string(),
                    key_version: 1,
                    kms: "demo".into(),
                    content: None,
                },
                integrity: Integrity::None,
                bypass_workqueues: true,
            };
            crypt::format(blank, &key, &opts).await?;
            Ok(())
        })
        .await?;
    let name = MapperName::for_volume("demo:volume-1");
    let mapped = name.device_path();
    let secret_text: Vec<u8> =
        b"cryptdisk demo: this sentence must never reach the disk in clear. "
            .iter()
            .copied()
            .cycle()
            .take(1 << 20)
            .collect();
    steps
        .run("open the mapping with the derived key", async {
            crypt::open(&disk, &name, &key, &OpenOptions::default()).await?;
            Ok(())
        })
        .await?;
    steps
        .run("write 1 MiB of text through dm-crypt", async {
            let mut f = FileOptions::new().write(true).open(&mapped)?;
            f.write_all(&secret_text)?;
            f.sync_all()?;
            Ok(())
        })
        .await?;
    steps
        .run("close the mapping", async {
            crypt::close(&name).await.map(|_| ()).map_err(Into::into)
        })
        .await?;
    let found = steps
        .run("scan the raw disk for the text", async {
            Ok(contains(&disk, &secret_text[..64])?)
        })
        .await?;
    println!(
        "demo:   plaintext on the raw disk: {}",
        if found { "FOUND (bad)" } else { "none" }
    );
    steps
        .run("reopen the mapping", async {
            crypt::open(&disk, &name, &key, &OpenOptions::default()).await?;
            Ok(())
        })
        .await?;
    let back = steps
        .run("read the text back", async {
            let mut f = File::open(&mapped)?;
            let mut buf = vec![0u8; secret_text.len()];
            f.read_exact(&mut buf)?;
            Ok(buf)
        })
        .await?;
    steps
        .run("close the mapping", async {
            crypt::close(&name).await.map(|_| ()).map_err(Into::into)
        })
        .await?;
    let same = back == secret_text;
    println!("demo:   read back intact: {same}");
    println!(
        "demo: total {:.1} ms over {} steps",
        steps.started.elapsed().as_secs_f64() * 1e3,
        steps.rows.len()
    );
    if found || !same {
        return Err("the round trip failed".into());
    }
    Ok(())
}

fn contains(device: &Path, needle: &[u8]) -> std::io::Result<bool> {
    let mut f = File::open(device)?;
    f.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        tail.extend_from_slice(&buf[..n]);
        if memchr::memmem::find(&tail, needle).is_some() {
            return Ok(true);
        }
        let keep = tail.len().min(needle.len() - 1);
        tail.drain(..tail.len() - keep);
    }
}
