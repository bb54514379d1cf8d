#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for CI and for trying profiles/slurm locally.
#
#   sudo .ci/setup_slurm.sh          # install (first time), configure, start, smoke-test
#   sudo .ci/setup_slurm.sh stop     # stop every daemon this script started
#   .ci/setup_slurm.sh status        # what runs, the node state and the partitions
#
# Starts munged, MariaDB + slurmdbd (job accounting, so that `sacct` works: it is the status
# command of Snakemake's SLURM executor plugin and the record the tests read), slurmctld
# and slurmd as plain background daemons on 127.0.0.1 (no systemd needed, so it works in
# containers). Debian 12 (bookworm) or Ubuntu, as root. It is idempotent: a second call
# installs nothing, rewrites the config files only if their content changed, and restarts a
# daemon only when its config changed or it is not healthy. Once the packages are installed
# it takes a few seconds.
#
# The cluster: ClusterName=local, one node (this host, all its cores, 90 % of the memory
# slurmd detects), one partition (default name `debug`) WITHOUT GPUs: a job asking for a GPU
# is refused by sbatch at once. Account `ci` is the default account of root and of the user
# named in SLURM_USERS. Finished jobs stay visible to squeue/scontrol for MinJobAge=300 s.
#
# Settings (environment variables):
#   SLURM_PARTITION=debug   name of the partition
#   SLURM_WITH_DBD=1        0: no MariaDB/slurmdbd (faster install; sacct then fails, so
#                           Snakemake must use `slurm-status-command: squeue`)
#   SLURM_USERS=""          extra user names (space-separated) to register under account ci
#   SLURM_FORCE_RESTART=1   restart every daemon even when healthy
#
# Logs: /var/log/slurm/{slurmctld,slurmd,slurmdbd}.log, /var/log/mysql/error.log.
set -euo pipefail

PARTITION="${SLURM_PARTITION:-debug}"
WITH_DBD="${SLURM_WITH_DBD:-1}"
EXTRA_USERS="${SLURM_USERS:-}"
FORCE_RESTART="${SLURM_FORCE_RESTART:-0}"
ACCOUNT=ci
CLUSTER=local
NODE="$(hostname -s)"

ETC=/etc/slurm
SLURM_CONF="$ETC/slurm.conf"
DBD_CONF="$ETC/slurmdbd.conf"
LOGDIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
PID_CTLD=/run/slurmctld.pid
PID_SLURMD=/run/slurmd.pid
PID_DBD=/run/slurmdbd.pid
PID_MUNGE=/run/munge/munged.pid
PID_MARIADB=/run/mysqld/mysqld.pid
DB_PASSWORD=slurm-local-ci   # the database only listens on 127.0.0.1 / its socket

say() { echo "[setup_slurm $(date +%T)] $*"; }
die() { echo "[setup_slurm] ERROR: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------
# daemons: a pid file is trusted only if its process is alive, not a zombie, and has the
# expected name (slurmctld cannot delete its root-owned pid file after dropping privileges,
# and a container's PID 1 may not reap exited daemons, so a stale pid file or a zombie with
# the recorded pid both happen).
# ------------------------------------------------------------------------------------------
running() {   # running <pidfile> <name...>
  local pidfile=$1; shift
  local pid comm state name
  [ -s "$pidfile" ] || return 1
  pid=$( { tr -dc 0-9 <"$pidfile"; } 2>/dev/null)
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] || return 1
  for name in "$@"; do [ "$comm" = "$name" ] && return 0; done
  return 1
}

stop_daemon() {   # stop_daemon <pidfile> <name...>: TERM, wait up to 10 s, then KILL
  local pidfile=$1; shift
  if running "$pidfile" "$@"; then
    local pid; pid=$( { tr -dc 0-9 <"$pidfile"; } 2>/dev/null)
    say "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do running "$pidfile" "$@" || break; sleep 0.2; done
    if running "$pidfile" "$@"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.3; fi
  fi
  rm -f "$pidfile"
}

wait_for() {   # wait_for <seconds> <command...>: poll every 0.2 s until the command succeeds
  local seconds=$1; shift
  local tries=$(( seconds * 5 ))
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

stop_all() {
  stop_daemon "$PID_SLURMD" slurmd
  stop_daemon "$PID_CTLD" slurmctld
  stop_daemon "$PID_DBD" slurmdbd
  stop_daemon "$PID_MARIADB" mariadbd mysqld
  stop_daemon "$PID_MUNGE" munged
}

show_status() {
  local d
  for d in "munged:$PID_MUNGE" "mariadbd:$PID_MARIADB" "slurmdbd:$PID_DBD" \
           "slurmctld:$PID_CTLD" "slurmd:$PID_SLURMD"; do
    if running "${d#*:}" "${d%%:*}" mysqld; then echo "${d%%:*}: running (pid $(tr -dc 0-9 <"${d#*:}"))"
    else echo "${d%%:*}: not running"; fi
  done
  command -v sinfo >/dev/null && { sinfo 2>&1; sinfo -h -N -o 'node %N: %c CPUs, %m MB memory' 2>&1; } || true
}

case "${1:-start}" in
  stop) [ "$(id -u)" = 0 ] || die "run as root"; stop_all; exit 0 ;;
  status) show_status; exit 0 ;;
  start) ;;
  *) die "unknown command '$1' (use: start, stop, status)" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"
START=$(date +%s)

# ------------------------------------------------------------------------------------------
# 1. packages (Debian's slurm-wlm 22.05 on bookworm)
# ------------------------------------------------------------------------------------------
packages=(munge slurmctld slurmd slurm-client)
[ "$WITH_DBD" = 1 ] && packages+=(slurmdbd mariadb-server)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]} (apt-get)"
  t0=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  say "installed in $(( $(date +%s) - t0 )) s"
fi

# ------------------------------------------------------------------------------------------
# 2. munge: shared key, one daemon
# ------------------------------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || { say "creating /etc/munge/munge.key"; mungekey --create --keyfile=/etc/munge/munge.key; }
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
munge_ok() { munge -n | unmunge; }
if ! munge_ok >/dev/null 2>&1; then
  stop_daemon "$PID_MUNGE" munged
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munge_ok || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ------------------------------------------------------------------------------------------
# 3. slurm.conf (and slurmdbd.conf); `changed` records whether the daemons must restart
# ------------------------------------------------------------------------------------------
changed=0
put_file() {   # put_file <path> <mode> <owner>: stdin -> path, only when the content differs
  local tmp; tmp=$(mktemp)
  cat >"$tmp"
  if ! cmp -s "$tmp" "$1"; then
    install -m "$2" -o "$3" -g "$3" "$tmp" "$1"; changed=1; say "wrote $1"
  fi
  rm -f "$tmp"
}

# The node as slurmd detects it (`slurmd -C`): its CPU count is the machine's, whatever
# OMP_NUM_THREADS or the CPU affinity of this shell (`nproc` obeys both; a node declared
# with fewer CPUs than it has is only a smaller node, with more it is drained).
# RealMemory above what slurmd detects drains the node: declare 90 % of it.
detected=$(slurmd -C)
detected_mb=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
[ -n "$detected_mb" ] || die "slurmd -C reports no RealMemory"
memory_mb=$(( detected_mb * 9 / 10 ))
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$detected")
[ -n "$cpus" ] || cpus=$(nproc --all)
install -d -m 0755 "$ETC"
install -d -o slurm -g slurm -m 0755 "$LOGDIR" "$CTLD_STATE"
install -d -m 0755 "$SLURMD_SPOOL"

if [ "$WITH_DBD" = 1 ]; then
  accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# sbatch refuses an account the user has no association with (as on a real cluster)
AccountingStorageEnforce=associations
# sacct shows each job's --comment (the Snakemake rule and wildcards)
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  accounting="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

put_file "$SLURM_CONF" 0644 root <<EOF
# written by .ci/setup_slurm.sh: a one-node cluster on 127.0.0.1
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$accounting
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$PID_CTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# Finished jobs stay in squeue/scontrol for 300 s: enough for Snakemake's squeue status
# command (it needs MinJobAge >= 3 x slurm-init-seconds-before-status-checks).
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# ------------------------------------------------------------------------------------------
# 4. accounting: MariaDB + slurmdbd, cluster/account/user associations
# ------------------------------------------------------------------------------------------
if [ "$WITH_DBD" = 1 ]; then
  install -d -o mysql -g mysql -m 0755 /run/mysqld /var/log/mysql
  if ! mysqladmin ping >/dev/null 2>&1; then
    stop_daemon "$PID_MARIADB" mariadbd mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    say "starting mariadbd"
    # mariadbd stays in the foreground: detach it fully (new session, no inherited fds),
    # so that a caller reading our output through a pipe is not kept waiting.
    (cd / && setsid -f /usr/sbin/mariadbd --user=mysql --pid-file="$PID_MARIADB" \
       --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
       --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1)
    wait_for 30 mysqladmin ping || die "MariaDB does not start (see /var/log/mysql/error.log)"
  fi
  mysql -u root <<EOSQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOSQL
  put_file "$DBD_CONF" 0600 slurm <<EOF
# written by .ci/setup_slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=$PID_DBD
LogFile=$LOGDIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
  if [ "$changed" = 1 ] || [ "$FORCE_RESTART" = 1 ] || ! running "$PID_DBD" slurmdbd; then
    stop_daemon "$PID_DBD" slurmdbd
    say "starting slurmdbd"
    /usr/sbin/slurmdbd
    wait_for 30 sacctmgr -n list cluster || die "slurmdbd does not answer (see $LOGDIR/slurmdbd.log)"
  fi
  # associations (each command is a no-op when the entry exists)
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" \
    || sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
  sacctmgr -n list account format=account | grep -qw "$ACCOUNT" \
    || sacctmgr -i -Q add account "$ACCOUNT" Cluster="$CLUSTER" Description="local CI" Organization=local >/dev/null
  for user in root $EXTRA_USERS; do
    sacctmgr -n list assoc user="$user" account="$ACCOUNT" format=user | grep -qw "$user" \
      || sacctmgr -i -Q add user "$user" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
  done
fi

# ------------------------------------------------------------------------------------------
# 5. slurmctld + slurmd
# ------------------------------------------------------------------------------------------
ctld_up() { scontrol ping | grep -q UP; }
if [ "$changed" = 1 ] || [ "$FORCE_RESTART" = 1 ] || ! running "$PID_CTLD" slurmctld \
   || ! running "$PID_SLURMD" slurmd || ! ctld_up >/dev/null 2>&1; then
  stop_daemon "$PID_SLURMD" slurmd
  stop_daemon "$PID_CTLD" slurmctld
  say "starting slurmctld"
  /usr/sbin/slurmctld
  wait_for 20 ctld_up || die "slurmctld does not answer (see $LOGDIR/slurmctld.log)"
  say "starting slurmd"
  /usr/sbin/slurmd -N "$NODE"
fi

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1 | tr -d '*~#$@+%!-'; }
state=""
for _ in $(seq 100); do
  state=$(node_state)
  case "$state" in
    idle|mix|alloc|comp) break ;;
    down|drain|drng|fail|inval) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
case "$state" in
  idle|mix|alloc|comp) ;;
  *) tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
     die "node $NODE is not usable (state '$state')" ;;
esac

# ------------------------------------------------------------------------------------------
# 6. smoke test: one batch job must complete (polled with scontrol: `sbatch --wait` polls
# slowly), and be in the accounting database
# ------------------------------------------------------------------------------------------
job=$(sbatch --parsable --job-name=setup-smoke-test -t 1 -o /dev/null --wrap true)
job_state=""
for _ in $(seq 150); do
  job_state=$(scontrol show job "$job" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
  case "$job_state" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL) break ;; esac
  sleep 0.2
done
[ "$job_state" = COMPLETED ] || die "smoke-test job $job ended as '$job_state' (see $LOGDIR/slurmd.log)"
if [ "$WITH_DBD" = 1 ]; then
  wait_for 20 sh -c "sacct -n -X -j $job -o State | grep -q COMPLETED" \
    || die "job $job is not in the accounting database (see $LOGDIR/slurmdbd.log)"
fi
say "ready in $(( $(date +%s) - START )) s: node $NODE, $cpus CPUs, ${memory_mb} MB, partition $PARTITION," \
    "account $ACCOUNT, accounting $([ "$WITH_DBD" = 1 ] && echo slurmdbd || echo none); smoke-test job $job $job_state"
