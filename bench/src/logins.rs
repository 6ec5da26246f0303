//! Logins per second against an account store: `Accounts::authenticate` from N concurrent
//! tasks for a fixed time, with the cache off (each login reaches the backend and verifies the
//! password hash) or on (the MSA's steady state for a returning user).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use ringmail_accounts::cache::Cache;
use ringmail_accounts::{Accounts, AuthOutcome};

use crate::util::parse_duration;

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The store URL (sqlite:PATH, postgres://…, ldap://…).
    #[arg(long)]
    db: String,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    /// Concurrent login tasks.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Keep the store's cache on (default: off, every login hits the backend).
    #[arg(long)]
    cached: bool,
}

pub fn run(args: LoginArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cache = if args.cached {
            Cache::default()
        } else {
            Cache::new(Duration::ZERO, Duration::ZERO, 1)
        };
        let accounts = Accounts::open_with_cache(&args.db, cache).await?;
        match accounts.authenticate(&args.user, &args.password).await? {
            AuthOutcome::Ok(_) => {}
            other => bail!("the benchmark login is refused: {other:?}"),
        }
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let (accounts, stop, count) = (accounts.clone(), Arc::clone(&stop), Arc::clone(&count));
            let (user, pw) = (args.user.clone(), args.password.clone());
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = matches!(accounts.authenticate(&user, &pw).await, Ok(AuthOutcome::Ok(_)));
                    let _ = h.record(t.elapsed().as_micros() as u64);
                    if ok {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                h
            }));
        }
        let start = Instant::now();
        tokio::time::sleep(args.duration).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Histogram::<u64>::new(3)?;
        for t in tasks {
            all.add(t.await?)?;
        }
        let secs = start.elapsed().as_secs_f64();
        let n = count.load(Ordering::Relaxed);
        println!(
            "{{\"store\":\"{}\",\"cached\":{},\"concurrency\":{},\"logins\":{n},\"seconds\":{secs:.2},\"logins_per_sec\":{:.1},\"p50_us\":{},\"p99_us\":{}}}",
            accounts.kind(),
            args.cached,
            args.concurrency,
            n as f64 / secs,
            all.value_at_quantile(0.5),
            all.value_at_quantile(0.99)
        );
        Ok(())
    })
}
