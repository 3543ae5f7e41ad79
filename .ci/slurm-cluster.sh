#!/usr/bin/env bash
# A single-node SLURM cluster on loopback for the SLURM executor's tests: munge, slurmctld and
# slurmd from Debian's packages, installed when missing and started here (nothing of this
# survives a fresh machine). Made for a container: process tracking by /proc (linuxproc) and no
# task or cgroup plugins, which fail silently there. The node offers every core and a fake GPU
# (no device file), so `--gres=gpu:1` is accepted. Idempotent: a cluster already answering is
# left as it is.
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm: a cluster is already up"
    exit 0
fi

host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

# munge: the key Debian's package made, or a new one; the daemon runs as its own user.
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --force >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
chmod 755 /run/munge
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done

# A new cluster each time: no state (jobs, drained nodes) from an earlier one.
for pid in /run/slurmctld.pid /run/slurmd.pid; do
    [ -s "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
done
sleep 0.5
rm -rf /var/spool/slurmctld /var/spool/slurmd
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=reprise-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
GresTypes=gpu
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
printf "AutoDetect=off\nName=gpu File=/dev/null\n" > /etc/slurm/gres.conf
# slurmd loads a cgroup plugin even when nothing uses it (Debian's 22.05 has no "disabled"):
# the one that matches what is mounted.
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then cgroup=cgroup/v2; else cgroup=cgroup/v1; fi
echo "CgroupPlugin=$cgroup" > /etc/slurm/cgroup.conf

slurmctld
slurmd
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "slurm: single-node cluster $host up ($cpus CPUs)"
        exit 0
    fi
    sleep 0.2
done
echo "error: the SLURM cluster did not come up; its logs:" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
