#!/usr/bin/env bash
# Start a real single-host Slurm cluster: munged, mariadb, slurmdbd, slurmctld and two slurmd
# nodes (node1, node2) on loopback. Idempotent: daemons already running are left alone.
#
#   eval "$(slurm/devcluster/start.sh)"      # prints `export SLURM_CONF=...` on stdout
#   sinfo; python launch/submit.py --cfg lsor.yaml --cfg smoke.yaml --nodes 2 --wait ...
#   slurm/devcluster/stop.sh
#
# State lives under $HPCBRAIN_DEVCLUSTER_DIR (default /tmp/hpcbrain-devcluster). Needs root
# (daemons run as root, /etc/hosts gets a node1/node2 line); installs the Debian packages with
# apt-get when they are missing. Options: --install-only (install the packages and exit).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null 2>&1 \
        || die "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    local apt=(apt-get install -y -q --no-install-recommends "${PACKAGES[@]}")
    # Installing must not start the distribution's own services (they would take the default
    # ports and /run paths): policy-rc.d says no while we install.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && created_policy=1
    fi
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2; then
        say "install failed; refreshing the package lists and retrying"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2
    fi
    ((created_policy)) && rm -f "$policy"
    return 0
}

render() {  # render TEMPLATE OUT MODE
    sed -e "s|@DIR@|$DEVCLUSTER_DIR|g" -e "s|@HOST@|$HOST|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@NODE1_PORT@|$NODE1_PORT|g" -e "s|@NODE2_PORT@|$NODE2_PORT|g" \
        -e "s|@NODE_CPUS@|$NODE_CPUS|g" -e "s|@NODE_MEM_MB@|$NODE_MEM_MB|g" \
        -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" -e "s|@DB_PASS@|$DB_PASS|g" "$1" > "$2.tmp"
    chmod "$3" "$2.tmp"
    mv "$2.tmp" "$2"
}

start_munge() {
    pid_of "$DEVCLUSTER_DIR/munge/munged.pid" munged >/dev/null && return 0
    local key=$DEVCLUSTER_DIR/munge/munge.key
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key.tmp" bs=1024 count=1 status=none
        chmod 400 "$key.tmp" && mv "$key.tmp" "$key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$key" \
        --pid-file="$DEVCLUSTER_DIR/munge/munged.pid" --log-file="$DEVCLUSTER_DIR/log/munged.log" \
        --seed-file="$DEVCLUSTER_DIR/munge/munged.seed"
    wait_for 10 munge bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" \
        || die "munged did not answer on $MUNGE_SOCKET (log: $DEVCLUSTER_DIR/log/munged.log)"
    say "munged up"
}

db() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot "$@"; }

start_mariadb() {
    pid_of "$DEVCLUSTER_DIR/run/mariadb.pid" mariadbd >/dev/null && return 0
    local datadir=$DEVCLUSTER_DIR/mysql/data
    if [[ ! -d $datadir/mysql ]]; then
        rm -rf "$datadir"
        mariadb-install-db --no-defaults --datadir="$datadir" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            > "$DEVCLUSTER_DIR/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed (log: $DEVCLUSTER_DIR/log/mariadb-install.log)"
    fi
    rm -f "$DB_SOCKET"
    setsid mariadbd --no-defaults --datadir="$datadir" --user=root --socket="$DB_SOCKET" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DEVCLUSTER_DIR/run/mariadb.pid" \
        --log-error="$DEVCLUSTER_DIR/log/mariadb.log" --skip-log-bin \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        < /dev/null >> "$DEVCLUSTER_DIR/log/mariadb.log" 2>&1 &
    wait_for 60 mariadb mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping \
        || die "mariadb did not come up (log: $DEVCLUSTER_DIR/log/mariadb.log)"
    db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
           ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
           FLUSH PRIVILEGES;"
    say "mariadb up on 127.0.0.1:$DB_PORT"
}

start_slurmdbd() {
    if ! pid_of "$DEVCLUSTER_DIR/run/slurmdbd.pid" slurmdbd >/dev/null; then
        slurmdbd || die "slurmdbd failed to start (log: $DEVCLUSTER_DIR/log/slurmdbd.log)"
    fi
    wait_for 60 slurmdbd sacctmgr -n show cluster \
        || die "slurmdbd did not answer on port $DBD_PORT (log: $DEVCLUSTER_DIR/log/slurmdbd.log)"
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx hpcbrain-dev; then
        sacctmgr -i add cluster hpcbrain-dev >&2
    fi
    say "slurmdbd up on 127.0.0.1:$DBD_PORT"
}

start_slurmctld() {
    pid_of "$DEVCLUSTER_DIR/run/slurmctld.pid" slurmctld >/dev/null && return 0
    slurmctld || die "slurmctld failed to start (log: $DEVCLUSTER_DIR/log/slurmctld.log)"
    wait_for 30 slurmctld scontrol ping \
        || die "slurmctld did not answer (log: $DEVCLUSTER_DIR/log/slurmctld.log)"
    say "slurmctld up on 127.0.0.1:$CTLD_PORT"
}

start_slurmd() {
    local node=$1
    mkdir -p "$DEVCLUSTER_DIR/spool/$node"
    pid_of "$DEVCLUSTER_DIR/run/slurmd-$node.pid" slurmd >/dev/null && return 0
    slurmd -N "$node" || die "slurmd $node failed to start (log: $DEVCLUSTER_DIR/log/slurmd-$node.log)"
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    grep -Eq '^node1 (idle|mix|alloc)' <<< "$states" && grep -Eq '^node2 (idle|mix|alloc)' <<< "$states"
}

main() {
    [[ $(id -u) == 0 ]] || die "needs root (the daemons run as root and /etc/hosts gets node1/node2)"
    export PATH=$PATH:/usr/sbin:/sbin
    install_packages
    [[ ${1:-} == --install-only ]] && exit 0

    HOST=$(hostname -s)
    export SLURM_CONF=$SLURM_CONF_FILE
    mkdir -p "$DEVCLUSTER_DIR"/{etc,run,log,spool/ctld,mysql}
    mkdir -p -m 755 "$DEVCLUSTER_DIR/munge"
    chmod 755 "$DEVCLUSTER_DIR" "$DEVCLUSTER_DIR/munge"   # munged checks its socket's folder
    if [[ ! -s $DEVCLUSTER_DIR/etc/db.pass ]]; then
        (umask 077; od -An -tx1 -N12 /dev/urandom | tr -d ' \n' > "$DEVCLUSTER_DIR/etc/db.pass")
    fi
    DB_PASS=$(cat "$DEVCLUSTER_DIR/etc/db.pass")
    render "$DEVCLUSTER_SRC/slurm.conf.in" "$SLURM_CONF_FILE" 644
    render "$DEVCLUSTER_SRC/slurmdbd.conf.in" "$DEVCLUSTER_DIR/etc/slurmdbd.conf" 600

    if ! grep -q "$HOSTS_MARKER" /etc/hosts; then
        echo "127.0.0.1 node1 node2 $HOSTS_MARKER" >> /etc/hosts
    fi

    local already=1
    while read -r file name; do
        pid_of "$file" "$name" >/dev/null || already=0
    done < <(daemons)

    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd node1
    start_slurmd node2
    if ! wait_for 30 nodes nodes_idle; then
        # Nodes left DOWN by an unclean stop come back with an explicit resume.
        scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
        wait_for 30 nodes nodes_idle || die "nodes not idle: $(sinfo -N 2>&1) (logs: $DEVCLUSTER_DIR/log)"
    fi
    if ((already)); then
        say "already running (state in $DEVCLUSTER_DIR)"
    else
        say "up: partition debug, nodes node1 node2 ($NODE_CPUS CPUs each), state in $DEVCLUSTER_DIR"
    fi
    echo "export SLURM_CONF=$SLURM_CONF_FILE" > "$DEVCLUSTER_DIR/env"
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
}

main "$@"
