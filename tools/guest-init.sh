#!/bin/sh
# /init of the memfs test guest (busybox-static initramfs, built by tools/mkguest).
#
# Why: a migration test must prove that guest RAM is unchanged across the move.
# This init fills RAM with known content, keeps a workload that reads and writes
# memory, and reports checksums and ticks on the serial console.
#
# Kernel command line:
#   memfs.fill=MiB   size of the fixed data (default 64)
#   memfs.work=N     pages in the workload's writable area (default 64)
#   memfs.tick=MS    tick period, 0 = no ticks (default 50)
#   memfs.sumevery=S print a SUM line every S seconds, 0 = never (default 0)
#   memfs.pace=MS    sleep between workload iterations (default 20)
#   memfs.dirty=MiB  opt-in (default 0: off): rewrite MiB MiB of a separate
#                    tmpfs (/dirty, not in any checksum) in a tight loop at the
#                    lowest priority, one cat per pass over the whole area, so
#                    the guest dirties memory faster than a slow link carries
#
# Console protocol (a command is one line written to ttyS0):
#   sum [ID]  -> SUM ID fill=<md5> work=<md5> gen=<G> maxgap=<ms>
#   gap       -> GAP <ms>      longest gap between ticks, by the guest's clock
#   resetgap  -> GAPRESET
#   ping [X]  -> PONG X
#   mark X    -> MARK X        writes X to /data/mark (a page of guest RAM)
#   readmark  -> MARKED X      what /data/mark holds
#   readdisk [DEV] -> READDISK DEV md5=<md5>  reads a whole disk (default /dev/vda,
#             a virtio-blk disk: its modules load on first use) into the page cache
#   macs      -> MACS IF=ADDR ...  the address of each network interface but lo
#             (/sys/class/net/*/address; virtio-net's modules load on first use)
#   poweroff  -> powers off
# Unprompted: "READY fill=.. work=.. tick=.." once; "T <n> <uptime_cs>" ticks.
#
# Data layout (R = /rand.bin, 257 pages made on the host by mkguest;
# R2 = R twice): MiB i of /data/fill is zeros if i%4==2, else 256 copies of the
# page R2[2:4098] if i%8==5, else R2[8r : 8r+1MiB] for the r-th such MiB; from
# MiB 16 on, MiB i is a copy of MiB i%16 (one cat instead of a process per
# MiB: a 2 GiB fill takes seconds under TCG, not minutes).
# Workload generation g writes R2[(g*7%257)*4096+4 : +4096] to page g%work of
# /data/work, then reads 256 KiB of /data/fill. Both files are in tmpfs, so
# they stay resident in guest RAM.

export PATH=/bin
mkdir -p /proc /sys /dev /run /data /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 0 > /proc/sys/kernel/printk

fill=64 work=64 tick=50 sumevery=0 pace=20 dirty=0
for a in $(cat /proc/cmdline); do
    case $a in
        memfs.fill=*) fill=${a#*=} ;;
        memfs.work=*) work=${a#*=} ;;
        memfs.tick=*) tick=${a#*=} ;;
        memfs.sumevery=*) sumevery=${a#*=} ;;
        memfs.pace=*) pace=${a#*=} ;;
        memfs.dirty=*) dirty=${a#*=} ;;
    esac
done

exec </dev/console >/dev/console 2>&1
stty -echo 2>/dev/null

RSIZE=$((257 * 4096))
PERIOD=16
mount -t tmpfs -o size=$((fill + work / 256 + PERIOD + 8))m tmpfs /data
mount -t tmpfs -o size=16m tmpfs /run
cat /rand.bin /rand.bin > /run/R2

# one page, repeated to 1 MiB by doubling
dd if=/run/R2 of=/run/rep bs=4096 count=1 iflag=skip_bytes skip=2 2>/dev/null
for k in 1 2 3 4 5 6 7 8; do cat /run/rep /run/rep > /run/rep2; mv /run/rep2 /run/rep; done

first=$fill
[ $first -gt $PERIOD ] && first=$PERIOD
i=0 r=0
while [ $i -lt $first ]; do
    if [ $((i % 4)) -eq 2 ]; then
        dd if=/dev/zero bs=1048576 count=1
    elif [ $((i % 8)) -eq 5 ]; then
        cat /run/rep
    else
        dd if=/run/R2 bs=1048576 count=1 iflag=skip_bytes skip=$(((r * 8) % RSIZE))
        r=$((r + 1))
    fi
    i=$((i + 1))
done 2>/dev/null > /data/period
if [ $fill -gt $PERIOD ]; then
    args="" k=0
    while [ $k -lt $((fill / PERIOD)) ]; do args="$args /data/period"; k=$((k + 1)); done
    cat $args > /data/fill
    rest=$((fill % PERIOD))
    [ $rest -gt 0 ] && head -c $((rest * 1048576)) /data/period >> /data/fill
    rm -f /data/period
else
    mv /data/period /data/fill
fi
rm -f /run/rep
dd if=/dev/zero of=/data/work bs=4096 count=$work 2>/dev/null
echo 0 > /run/maxgap

uptime_cs() {
    read up _ < /proc/uptime
    echo $((${up%.*} * 100 + 1${up#*.} - 100))
}

do_sum() {  # $1 = id; run by the workload so that gen and work agree
    f=$(md5sum < /data/fill)
    w=$(md5sum < /data/work)
    echo "SUM $1 fill=${f%% *} work=${w%% *} gen=$g maxgap=$(($(cat /run/maxgap) * 10))"
}

workload() {
    g=0
    nextsum=0
    [ "$sumevery" -gt 0 ] && nextsum=$(($(uptime_cs) + sumevery * 100))
    fpages=$((fill * 256))
    while :; do
        dd if=/run/R2 of=/data/work bs=4096 count=1 seek=$((g % work)) conv=notrunc \
            iflag=skip_bytes skip=$(((g * 7 % 257) * 4096 + 4)) 2>/dev/null
        g=$((g + 1))
        [ $fpages -gt 0 ] && dd if=/data/fill of=/dev/null bs=4096 count=64 \
            skip=$(((g * 64) % fpages)) 2>/dev/null
        if [ -e /run/sumreq ]; then
            id=$(cat /run/sumreq)
            rm -f /run/sumreq
            do_sum "$id"
        fi
        if [ "$nextsum" -gt 0 ] && [ "$(uptime_cs)" -ge "$nextsum" ]; then
            do_sum periodic
            nextsum=$(($(uptime_cs) + sumevery * 100))
        fi
        [ "$pace" -gt 0 ] && usleep $((pace * 1000))
    done
}

ticker() {
    n=0 last= max=0
    while :; do
        read up _ < /proc/uptime
        cs=$((${up%.*} * 100 + 1${up#*.} - 100))
        if [ -e /run/gapreset ]; then
            rm -f /run/gapreset
            max=0
            echo 0 > /run/maxgap
        elif [ -n "$last" ] && [ $((cs - last)) -gt $max ]; then
            max=$((cs - last))
            echo $max > /run/maxgap
        fi
        last=$cs
        echo "T $n $cs"
        n=$((n + 1))
        usleep $((tick * 1000))
    done
}

dirtier() {  # memfs.dirty: every pass rewrites all of /dirty/area in place
    # (1<> opens without truncating: the same guest pages each pass); the two
    # sources alternate, so every pass changes every page's content
    a="" b="" k=0
    while [ $k -lt $dirty ]; do a="$a /run/dirty0"; b="$b /run/dirty1"; k=$((k + 1)); done
    while :; do
        cat $a 1<> /dirty/area
        cat $b 1<> /dirty/area
    done
}

workload &
[ "$tick" -gt 0 ] && ticker &
if [ "$dirty" -gt 0 ]; then
    mkdir -p /dirty
    mount -t tmpfs -o size=$((dirty + 1))m tmpfs /dirty
    dd if=/run/R2 of=/run/dirty0 bs=1048576 count=1 iflag=skip_bytes skip=12 2>/dev/null
    dd if=/run/R2 of=/run/dirty1 bs=1048576 count=1 iflag=skip_bytes skip=4100 2>/dev/null
    dirtier &
    renice -n 19 -p $! >/dev/null 2>&1
    echo "READY fill=$fill work=$work tick=$tick dirty=$dirty"
else
    echo "READY fill=$fill work=$work tick=$tick"
fi

while :; do
    while read -r cmd arg; do
        case $cmd in
            sum) echo "${arg:--}" > /run/sumreq.tmp && mv /run/sumreq.tmp /run/sumreq ;;
            gap) echo "GAP $(($(cat /run/maxgap) * 10))" ;;
            resetgap) touch /run/gapreset; echo GAPRESET ;;
            ping) echo "PONG $arg" ;;
            mark) printf '%s' "$arg" > /data/mark; echo "MARK $arg" ;;
            readmark) echo "MARKED $(cat /data/mark 2>/dev/null)" ;;
            readdisk) dev=${arg:-/dev/vda}
                if [ ! -b "$dev" ]; then
                    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev \
                            virtio_pci virtio_blk; do
                        [ -e /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
                    done
                    n=0
                    while [ ! -b "$dev" ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
                fi
                if [ -b "$dev" ]; then
                    s=$(md5sum < "$dev")
                    echo "READDISK $dev md5=${s%% *}"
                else
                    echo "ERR no disk $dev"
                fi ;;
            macs) if [ ! -d /sys/bus/virtio/drivers/virtio_net ]; then
                    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev \
                            virtio_pci failover net_failover virtio_net; do
                        [ -e /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
                    done
                fi
                out=MACS
                for d in /sys/class/net/*; do
                    [ "${d##*/}" = lo ] || [ ! -e "$d/address" ] || out="$out ${d##*/}=$(cat "$d/address")"
                done
                echo "$out" ;;
            poweroff) sync; poweroff -f ;;
            '') ;;
            *) echo "ERR unknown command: $cmd" ;;
        esac
    done
    sleep 1
done
