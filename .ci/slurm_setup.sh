#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine from Debian's packages (slurm-wlm, munge),
# for tests/test_slurm.py (profiles/slurm through snakemake-executor-plugin-slurm).
#
#   sudo bash .ci/slurm_setup.sh        # idempotent: a running, healthy cluster with the same
#                                       # configuration is left alone; a changed one is restarted
#
# Runs as root on Debian/Ubuntu with apt-get. Works without systemd (containers, gVisor): munged,
# slurmctld and slurmd are started directly as daemons with their pid files under /run.
#
# Choices (all for a throw-away CI node, not for production):
# - slurmctld and slurmd on this host: NodeName/SlurmctldHost = `hostname -s`, addressed as
#   127.0.0.1 so that no DNS or /etc/hosts entry is needed; the node's CPU topology comes from
#   `slurmd -C`, RealMemory from /proc/meminfo minus a margin (slurmd drains a node that reports
#   less memory than configured).
# - No cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
#   JobAcctGatherType=jobacct_gather/linux, cgroup.conf CgroupPlugin=cgroup/v1 (loaded, never used). Containers (Docker without --privileged, gVisor)
#   rarely give a writable, delegated cgroup tree, and proctrack/cgroup makes slurmd refuse to
#   start there. Memory requests are still honoured by the scheduler (SelectType=select/cons_tres,
#   CR_Core_Memory: a job gets only the memory it asked for out of RealMemory), they are just not
#   enforced by the kernel.
# - No slurmdbd: AccountingStorageType=accounting_storage/none. The Snakemake executor plugin asks
#   for job states with `squeue --states=all` (profiles/slurm: slurm-status-command: squeue), which
#   slurmctld answers for finished jobs as long as they are younger than MinJobAge; MinJobAge is
#   set to 1 h here (the plugin uses squeue only when MinJobAge >= 3 x its first status delay, and
#   falls back to sacct otherwise, which would fail without a database). Finished jobs are also
#   written to the job-completion log /var/log/slurm/jobcomp.log (JobCompType=jobcomp/filetxt), a
#   record that outlives MinJobAge.
set -euo pipefail

die() { echo "slurm_setup: ERROR: $*" >&2; exit 1; }
log() { echo "slurm_setup: $*"; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"
command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu)"

# ------------------------------------------------------------------------------------ packages
need=()
for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
if ((${#need[@]})); then
    log "installing slurm-wlm and munge (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    # policy-rc.d may refuse to start the services from the packages' scripts: we start them below
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
fi
for cmd in slurmctld slurmd sbatch squeue sinfo scontrol munged mungekey; do
    command -v "$cmd" >/dev/null || die "$cmd not found after installing slurm-wlm and munge"
done

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {   # stop the daemon of one pid file (ours only), wait until it is gone
    local f=$1 pid
    pid_alive "$f" || return 0
    pid=$(cat "$f")
    log "stopping $(basename "$f" .pid) (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

# --------------------------------------------------------------------------------------- munge
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating the munge key"
    mungekey --create --keyfile /etc/munge/munge.key || die "mungekey --create failed"
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
if ! pid_alive "$MUNGE_PID"; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2*   # a stale socket from a dead munged blocks the start
    runuser -u munge -- munged --pid-file="$MUNGE_PID" || die "munged did not start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n </dev/null | unmunge >/dev/null || die "munge does not work (munge -n | unmunge failed)"

# ---------------------------------------------------------------------------------- slurm.conf
HOST=$(hostname -s)
[[ -n $HOST ]] || die "hostname -s is empty"
# CPUs and topology as slurmd detects them (CPUs=$(nproc) only when slurmd -C says nothing)
HW=$(slurmd -C 2>/dev/null | head -n1 | grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' | tr '\n' ' ' || true)
[[ $HW == *CPUs=* ]] || HW="CPUs=$(nproc)"
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
MARGIN=$(( MEM_MB / 20 > 512 ? MEM_MB / 20 : 512 ))   # 5 %, at least 512 MB, left to the system
REAL_MB=$(( MEM_MB - MARGIN ))
(( REAL_MB >= 1024 )) || die "only ${MEM_MB} MB of memory: too little for a SLURM node"

install -d -m 0755 /etc/slurm
install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
install -d -o root -g root -m 0755 /var/spool/slurmd
touch /var/log/slurm/jobcomp.log && chown slurm:slurm /var/log/slurm/jobcomp.log

CONF=$(cat <<EOF
# Written by .ci/slurm_setup.sh: a single-node test cluster (see the comments in that script).
ClusterName=msifusion
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
# no cgroups (containers): see the script's header
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# scheduling: cores and memory are consumable; a job gets what it asked for
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# no slurmdbd: squeue answers for finished jobs during MinJobAge; jobcomp keeps a record
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MinJobAge=3600
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
KillWait=30
Waittime=0
NodeName=${HOST} NodeAddr=127.0.0.1 NodeHostname=${HOST} ${HW}RealMemory=${REAL_MB} State=UNKNOWN
PartitionName=main Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
)
CHANGED=0
if [[ ! -f /etc/slurm/slurm.conf ]] || [[ "$(cat /etc/slurm/slurm.conf)" != "$CONF" ]]; then
    log "writing /etc/slurm/slurm.conf (node ${HOST}: ${HW}RealMemory=${REAL_MB})"
    printf '%s\n' "$CONF" >/etc/slurm/slurm.conf
    CHANGED=1
fi
# slurmd 22.05 loads a cgroup plugin even when proctrack and task do not use cgroups (the option
# CgroupPlugin=disabled only exists from Slurm 23.11 on). Autodetection picks cgroup/v2 on a
# cgroup-v2 host, whose init wants a systemd-delegated scope for slurmd (fails without systemd);
# cgroup/v1's init touches no cgroup file system, and nothing else calls it with the plugins above.
CGROUP=$'# Written by .ci/slurm_setup.sh (see there): no cgroups are used by this node.\nCgroupPlugin=cgroup/v1'
if [[ ! -f /etc/slurm/cgroup.conf ]] || [[ "$(cat /etc/slurm/cgroup.conf)" != "$CGROUP" ]]; then
    printf '%s\n' "$CGROUP" >/etc/slurm/cgroup.conf
    CHANGED=1
fi

# ------------------------------------------------------------------------------------- daemons
if ((CHANGED)); then
    stop_pidfile /run/slurmd.pid
    stop_pidfile /run/slurmctld.pid
fi
if ! pid_alive /run/slurmctld.pid; then
    log "starting slurmctld"
    slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
fi
for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 1; done
scontrol ping 2>/dev/null | grep -q "is UP" || die "slurmctld does not answer (see /var/log/slurm/slurmctld.log)"
if ! pid_alive /run/slurmd.pid; then
    log "starting slurmd"
    slurmd || die "slurmd did not start (see /var/log/slurm/slurmd.log)"
fi

node_state() { sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1; }
for _ in $(seq 60); do
    case $(node_state) in idle*|mixed*|allocated*) break ;; esac
    sleep 1
done
state=$(node_state)
case $state in
    idle*|mixed*|allocated*) ;;
    drain*|down*) scontrol update NodeName="$HOST" State=RESUME || true
                  sleep 2; state=$(node_state)
                  [[ $state == idle* || $state == mixed* || $state == allocated* ]] \
                      || die "node $HOST is $state: $(sinfo -h -N -n "$HOST" -o '%E')" ;;
    *) die "node $HOST is '${state:-unknown}', not idle (see /var/log/slurm/slurmd.log)" ;;
esac
log "node $HOST is $state"

# ------------------------------------------------------------------------------- a test job
out=$(mktemp -d)
chmod 0777 "$out"
jobid=$(sbatch --parsable -p main -n 1 --mem=100 -t 2 -o "$out/hostname.out" --wrap hostname) \
    || die "sbatch --wrap hostname failed"
for _ in $(seq 120); do
    st=$(squeue -h -j "$jobid" --states=all -o '%T' 2>/dev/null || true)
    case $st in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL) break ;; esac
    sleep 1
done
[[ $st == COMPLETED ]] || die "test job $jobid ended as '${st:-unknown}' (see /var/log/slurm/)"
grep -qx "$HOST" "$out/hostname.out" || die "test job $jobid wrote '$(cat "$out/hostname.out")', not $HOST"
rm -rf "$out"
log "test job $jobid COMPLETED on $HOST: cluster ready (sinfo, squeue, sbatch)"
