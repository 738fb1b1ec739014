//! `starling-bench keys`: FetchKeyBundles per second against a running server, and a check that
//! no one-time prekey was handed out twice.
//!
//! Setup: each of the `--conns` accounts (from `starling-bench register`) uploads a device
//! identity, a signed prekey and `--prekeys` one-time prekeys (100 per UploadKeys; the server's
//! `keys.one_time_prekeys_max` must allow them). Run: every connection keeps `--window`
//! FetchKeyBundles in flight for `--secs`, for the bundle of the account `--spread` places
//! after its own (its own with 0; another user's needs the server's visibility rule to allow
//! it, which `--spread 0` always does), each timed from its write to the read of its answer.
//! The report gives fetches per second, how many carried a one-time prekey (the rest had only
//! the signed prekey: the stock ran out), the latency percentiles, and the number of one-time
//! prekeys seen twice (must be 0).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use starling_client::e2e::{DeviceKeys, ONE_TIME_PREKEYS_PER_UPLOAD_MAX};
use starling_protocol::v1::{self, frame::Body};

use crate::accounts::{Account, AccountsFile};
use crate::clock::{self, Stopwatch};
use crate::net::{StarlingConn, Target, describe_error, source_addr, tls_for};
use crate::report::{self, Machine, Summary};

#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct KeysArgs {
    /// tls://IP:PORT or plain://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    target: String,
    /// CA certificate for TLS [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Starling's data directory (for the default CA path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Accounts file from `starling-bench register` (one account per connection).
    #[arg(long, default_value = "bench-accounts.json")]
    accounts: PathBuf,
    /// Connections, each signed in as its own account.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// FetchKeyBundles each connection keeps unanswered (at most the server's in-flight limit).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// One-time prekeys each account uploads before the run (a multiple of 100 is exact).
    #[arg(long, default_value_t = 1000)]
    prekeys: u32,
    /// Each connection fetches the bundle of the account this many places after its own.
    #[arg(long, default_value_t = 0)]
    spread: usize,
    /// Seconds of fetching.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Source addresses to spread connections over.
    #[arg(long, default_value_t = 200)]
    sources: u32,
    /// The server's pid, to measure its CPU.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the full report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Outcome {
    fetches: u64,
    fetches_per_s: f64,
    with_one_time_prekey: u64,
    signed_prekey_only: u64,
    handed_out_twice: u64,
    errors: u64,
    first_error: Option<String>,
    latency_us: Summary,
    server_cpu_cores: Option<f64>,
}

#[derive(Default)]
struct Tally {
    fetches: u64,
    with_otk: u64,
    signed_only: u64,
    errors: u64,
    first_error: Option<String>,
    /// (user, device, key id) handed out.
    seen: HashSet<(u64, u32, u32)>,
    twice: u64,
}

pub(crate) fn run(args: &KeysArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(
        args.conns > 0 && args.secs > 0,
        "--conns and --secs must be > 0"
    );
    anyhow::ensure!(
        (1..=64).contains(&args.window),
        "--window must be between 1 and 64"
    );
    let accounts = AccountsFile::load(&args.accounts)?;
    accounts.need(args.conns, &args.accounts)?;
    let tls = tls_for(&target, args.ca.as_deref(), args.data_dir.as_deref(), false)?;
    let machine = Machine::now();
    let accounts = accounts.accounts[..args.conns].to_vec();
    let out = crate::workers::block_on(async {
        tokio::task::LocalSet::new()
            .run_until(run_fetches(args, &target, tls, &accounts))
            .await
    })??;
    println!(
        "keys: {:.0} fetches/s over {} connections (window {}): {} with a one-time prekey, {} \
         signed prekey only, {} handed out twice, {} errors",
        out.fetches_per_s,
        args.conns,
        args.window,
        out.with_one_time_prekey,
        out.signed_prekey_only,
        out.handed_out_twice,
        out.errors
    );
    report::print_latency_table(&[("FetchKeyBundles", &out.latency_us)]);
    if let Some(cores) = out.server_cpu_cores {
        println!("server CPU: {cores:.2} cores");
    }
    if let Some(p) = &args.json {
        report::write_json(
            p,
            &serde_json::json!({
                "subcommand": "keys",
                "params": args,
                "machine": machine,
                "outcome": out,
            }),
        )?;
    }
    if out.handed_out_twice > 0 {
        bail!(
            "{} one-time prekeys were handed out twice",
            out.handed_out_twice
        );
    }
    if out.fetches == 0 {
        bail!(
            "no fetch was answered: {}",
            out.first_error.unwrap_or_default()
        );
    }
    Ok(())
}

async fn run_fetches(
    args: &KeysArgs,
    target: &Target,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    accounts: &[Account],
) -> anyhow::Result<Outcome> {
    let mut conns = Vec::with_capacity(accounts.len());
    for (i, acc) in accounts.iter().enumerate() {
        report::progress(&format!(
            "keys: connecting and uploading {}/{}",
            i + 1,
            accounts.len()
        ));
        let src = source_addr(i as u64, args.sources, target.addr());
        let mut c = StarlingConn::open_authenticated(
            target.addr(),
            src,
            tls.as_ref(),
            Duration::from_secs(10),
            &acc.access_token,
            &acc.email,
        )
        .await?;
        upload(&mut c, args.prekeys, &acc.email).await?;
        conns.push(c);
    }
    report::progress_done();
    let tally = Rc::new(RefCell::new(Tally::default()));
    let hist = Rc::new(RefCell::new(report::histogram()));
    let deadline = clock::now() + Duration::from_secs(args.secs);
    let cpu0 = args.server_pid.and_then(report::cpu_secs);
    let sw = Stopwatch::start();
    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        let user = accounts[(i + args.spread) % accounts.len()].user_id;
        tasks.push(tokio::task::spawn_local(fetch_loop(
            c,
            user,
            args.window,
            deadline,
            tally.clone(),
            hist.clone(),
        )));
    }
    for t in tasks {
        t.await.context("a fetch task failed")?;
    }
    let secs = sw.elapsed_secs();
    let cpu = cpu0
        .zip(args.server_pid.and_then(report::cpu_secs))
        .map(|(a, b)| (b - a) / secs.max(1e-9));
    let t = tally.borrow();
    Ok(Outcome {
        fetches: t.fetches,
        fetches_per_s: t.fetches as f64 / secs.max(1e-9),
        with_one_time_prekey: t.with_otk,
        signed_prekey_only: t.signed_only,
        handed_out_twice: t.twice,
        errors: t.errors,
        first_error: t.first_error.clone(),
        latency_us: Summary::of(&hist.borrow()),
        server_cpu_cores: cpu,
    })
}

/// Identity, signed prekey and `prekeys` one-time prekeys for the connection's device.
async fn upload(c: &mut StarlingConn, prekeys: u32, who: &str) -> anyhow::Result<()> {
    let mut keys = DeviceKeys::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut left = prekeys;
    loop {
        let n = left.min(ONE_TIME_PREKEYS_PER_UPLOAD_MAX);
        let up = keys.next_upload(n).map_err(|e| anyhow::anyhow!("{e}"))?;
        match c.request(Body::UploadKeys(up)).await? {
            Body::PrekeyCount(_) => keys.published(),
            Body::Error(e) => bail!("UploadKeys of {who} refused: {}", describe_error(&e)),
            other => bail!("unexpected answer to UploadKeys: {}", other.kind().name()),
        }
        left -= n;
        if left == 0 {
            return Ok(());
        }
    }
}

async fn fetch_loop(
    mut c: StarlingConn,
    user: u64,
    window: usize,
    deadline: Instant,
    tally: Rc<RefCell<Tally>>,
    hist: Rc<RefCell<Histogram<u64>>>,
) {
    let req = Body::FetchKeyBundles(v1::FetchKeyBundles {
        user_id: user,
        device_ids: vec![],
        list_only: false,
    });
    let mut inflight: HashMap<u64, Instant> = HashMap::new();
    let fail = |t: &Rc<RefCell<Tally>>, why: String| {
        let mut t = t.borrow_mut();
        t.errors += 1;
        t.first_error.get_or_insert(why);
    };
    loop {
        while inflight.len() < window && clock::now() < deadline {
            let rid = c.rid();
            if let Err(e) = c.push(rid, req.clone()) {
                return fail(&tally, e.to_string());
            }
            inflight.insert(rid, clock::now());
        }
        if inflight.is_empty() {
            return;
        }
        if let Err(e) = c.flush().await {
            return fail(&tally, e.to_string());
        }
        let f = match c.recv().await {
            Ok(f) => f,
            Err(e) => return fail(&tally, e.to_string()),
        };
        let Some(sent) = inflight.remove(&f.request_id) else {
            continue; // a push
        };
        let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        let _ = hist.borrow_mut().record(us.max(1));
        match f.body {
            Some(Body::KeyBundles(k)) => {
                let mut t = tally.borrow_mut();
                t.fetches += 1;
                for b in k.bundles {
                    match b.one_time_prekey {
                        Some(otk) => {
                            t.with_otk += 1;
                            if !t.seen.insert((b.user_id, b.device_id, otk.key_id)) {
                                t.twice += 1;
                            }
                        }
                        None => t.signed_only += 1,
                    }
                }
            }
            Some(Body::Error(e)) => fail(&tally, describe_error(&e)),
            other => fail(&tally, format!("unexpected answer: {other:?}")),
        }
    }
}
