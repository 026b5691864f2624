#!/bin/busybox sh
# obd microVM init (/init of the initramfs built by frontends/run/vm/assets.py).
#
# As PID 1 it loads the virtio modules, mounts the disk /dev/vda as the new root (read-only unless
# the kernel command line says "rw"), mounts /proc, /sys, /dev (+ /dev/pts, /dev/shm) and, on a
# read-only root, a tmpfs on /tmp and /run inside it, then runs this same script a second time,
# chrooted into the new root, to start the command. When the command ends it syncs, unmounts and
# powers off.
#
# Mount points the image lacks (a FROM-scratch image has none): on a writable root they are created
# in it, as Docker does. A read-only root is never written: when one is missing, the image moves to
# /image and the new root becomes a tmpfs skeleton holding the mount points plus a bind mount (or, for
# a symlink, a copy) of each top-level entry of the image; the skeleton is then made read-only.
#
# The host reads the serial console (docs/vm.md has the protocol):
#   OBD-START-<nonce>          the command starts; everything after it is the command's output
#   OBD-EXIT-<nonce>: <code>   it ended with this exit code (printed after the root was synced)
#   OBD-ERROR-<nonce>: <text>  the VM could not run the command (no root device, mount failed...)
#   OBD-PROBE-OK-<nonce>       answer to obd.probe=1 (the KVM probe boot): userspace runs
#
# The command comes from obd.cmd= on the kernel command line, or from /obd/cmd when the host appended
# it to the initramfs because it was too long for the command line. Format: comma-separated fields,
# "1" (the version), then base64 of: workdir, user, the number of environment entries, each
# "NAME=value" entry, each argv element; an empty value is written "-". Decoded values only ever
# travel as positional parameters, so quotes, spaces and newlines in them are never re-parsed.

PATH=/bin
export PATH
set -f # no pathname expansion anywhere: command-line words and decoded values are data
nonce=unset

error() {
    echo "OBD-ERROR-$nonce: $*"
}

# --- second run: inside the chroot, as root, with busybox from the initramfs --------------------
#
# Arguments: nonce workdir user nenv env... argv...
# Changes to the working directory, resolves the user (OCI "user[:group]", names looked up in the
# image's /etc/passwd and /etc/group, read with the shell alone: no process per lookup), resolves
# argv[0] against the command's PATH, then runs
#   env -i -- ENV... [HOME=...] nsenter -S UID -G GID -- PROGRAM ARGS... </dev/null
inner() {
    nonce=$1 wd=$2 user=$3 nenv=$4
    shift 4
    if ! cd -- "$wd" 2>/dev/null; then
        mkdir -p -- "$wd" 2>/dev/null && cd -- "$wd" 2>/dev/null || {
            error "cannot use the working directory $wd"
            exit 125
        }
    fi

    uname=${user%%:*} gname=
    [ -n "$uname" ] || uname=0
    case $user in *:*) gname=${user#*:} ;; esac
    uid=0 gid=0 home=/
    case $uname in
        *[!0-9]*) key=1 ;; # a name: match the first passwd field
        *) key=3 uid=$uname ;;
    esac
    found=0
    if [ -r /etc/passwd ]; then
        while IFS=: read -r f1 _ f3 f4 _ f6 _ || [ -n "$f1" ]; do
            if { [ "$key" = 1 ] && [ "$f1" = "$uname" ]; } || { [ "$key" = 3 ] && [ "$f3" = "$uname" ]; }; then
                uid=$f3 gid=$f4 home=$f6 found=1
                break
            fi
        done </etc/passwd
    fi
    if [ "$found" = 0 ] && [ "$key" = 1 ]; then
        error "user $uname is not in the image's /etc/passwd"
        exit 125
    fi
    case $gname in
        '') ;;
        *[!0-9]*)
            gid=
            if [ -r /etc/group ]; then
                while IFS=: read -r f1 _ f3 _ || [ -n "$f1" ]; do
                    if [ "$f1" = "$gname" ]; then
                        gid=$f3
                        break
                    fi
                done </etc/group
            fi
            if [ -z "$gid" ]; then
                error "group $gname is not in the image's /etc/group"
                exit 125
            fi
            ;;
        *) gid=$gname ;;
    esac
    [ -n "$home" ] || home=/

    # Rotate the positional parameters once: keep env entries (noting PATH and HOME), replace
    # argv[0] by nsenter + the resolved program, keep the remaining arguments.
    total=$# i=0 path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin has_home=0
    prog= arg0=
    while [ "$i" -lt "$total" ]; do
        a=$1
        shift
        i=$((i + 1))
        if [ "$i" -le "$nenv" ]; then
            case $a in
                PATH=*) path=${a#PATH=} ;;
                HOME=*) has_home=1 ;;
            esac
            set -- "$@" "$a"
        elif [ "$i" -eq $((nenv + 1)) ]; then
            prog=$a arg0=$a
            case $a in
                */*) ;;
                "") prog= ;;
                *)
                    prog=
                    IFS=:
                    for d in $path; do
                        [ -n "$d" ] || d=.
                        if [ -f "$d/$a" ] && [ -x "$d/$a" ]; then
                            prog=$d/$a
                            break
                        fi
                    done
                    unset IFS
                    ;;
            esac
            case $prog in -*) prog=./$prog ;; esac
            [ "$has_home" = 1 ] || set -- "$@" "HOME=$home"
            set -- "$@" nsenter -S "$uid" -G "$gid" -- "$prog"
        else
            set -- "$@" "$a"
        fi
    done

    read -r up _ </proc/uptime
    echo "obd-init: uptime $up exec"
    echo "OBD-START-$nonce"
    if [ -z "$prog" ]; then
        if [ "$total" -gt "$nenv" ]; then
            echo "obd: $arg0: command not found" >&2
        else
            echo "obd: no command given" >&2
        fi
        exit 127
    fi
    # The running command's stdout and stderr are the console; its stdin is /dev/null.
    exec env -i -- "$@" </dev/null
}

if [ "$$" != 1 ]; then
    [ "$1" = obd-inner ] || {
        echo "usage: this is the obd VM init; it runs as PID 1" >&2
        exit 2
    }
    shift
    inner "$@"
    exit 125
fi

# --- first run: PID 1 in the initramfs -----------------------------------------------------------

poweroff_now() {
    sync
    poweroff -f
    sleep 60 # poweroff -f does not return; never let PID 1 exit (that would panic)
}

die() {
    error "$*"
    poweroff_now
}

mount -t proc -o nosuid,nodev,noexec proc /proc
read -r up _ </proc/uptime
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
exec </dev/null
dmesg -n 1 # from here on only emergencies reach the console
echo "obd-init: uptime $up init"
# Pass output bytes through unchanged (no \n -> \r\n), so the host receives exactly what the
# command wrote.
stty -F /dev/console -opost -echo 2>/dev/null

spec='' rw=0 fstype=ext4 rootdev=/dev/vda rootwait=10 probe=0
for word in $(cat /proc/cmdline); do
    case $word in
        obd.nonce=*) nonce=${word#obd.nonce=} ;;
        obd.cmd=*) spec=${word#obd.cmd=} ;;
        obd.probe=1) probe=1 ;;
        obd.root=*) rootdev=${word#obd.root=} ;;
        obd.rootwait=*) rootwait=${word#obd.rootwait=} ;;
        rootfstype=*) fstype=${word#rootfstype=} ;;
        rw) rw=1 ;;
        ro) rw=0 ;;
    esac
done

if [ "$probe" = 1 ]; then
    echo "OBD-PROBE-OK-$nonce"
    poweroff_now
fi

while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/$module" || echo "obd-init: insmod $module failed"
done </obd/modules

case $rootwait in '' | *[!0-9]*) rootwait=10 ;; esac
waited=0
while [ ! -b "$rootdev" ]; do
    [ "$waited" -lt $((rootwait * 100)) ] || die "no root device $rootdev after ${rootwait}s"
    usleep 10000
    waited=$((waited + 1))
done

opts=ro
[ "$rw" = 1 ] && opts=rw
mount -t "$fstype" -o "$opts" "$rootdev" /newroot ||
    die "cannot mount the root filesystem $rootdev (type $fstype, $opts)"

MOUNT_POINTS="/proc /sys /dev /tmp /run"

# skeleton: rebuild the read-only root as a tmpfs with every mount point, the image's top-level
# entries bind-mounted (directories, files) or copied (symlinks, device nodes) into it.
skeleton() {
    mkdir -p /image
    mount -o move /newroot /image || return 1
    mount -t tmpfs -o mode=0755 root /newroot || return 1
    set +f
    for e in /image/.* /image/*; do
        n=${e##*/}
        case $n in . | ..) continue ;; esac
        [ -e "$e" ] || [ -L "$e" ] || continue # a pattern that matched nothing
        t=/newroot/$n
        if [ -L "$e" ]; then
            ln -s "$(readlink "$e")" "$t"
        elif [ -d "$e" ]; then
            mkdir "$t" && mount -o bind "$e" "$t"
        elif [ -f "$e" ]; then
            : >"$t" && mount -o bind "$e" "$t"
        else
            cp -a "$e" "$t"
        fi || echo "obd-init: cannot place /$n in the root"
    done
    set -f
    for d in $MOUNT_POINTS; do
        [ -d "/newroot$d" ] || mkdir "/newroot$d" || return 1
    done
}

missing=0
for d in $MOUNT_POINTS; do
    [ -d "/newroot$d" ] || missing=1
done
if [ "$missing" = 1 ]; then
    if [ "$rw" = 1 ]; then
        for d in /proc /sys /dev; do
            [ -d "/newroot$d" ] || mkdir -p "/newroot$d" || die "cannot create $d in the root filesystem"
        done
    else
        skeleton || die "cannot build a root with /proc, /sys, /dev, /tmp and /run over the read-only image"
    fi
fi

# submount FSTYPE DIR OPTIONS: mount inside the new root, where DIR exists.
submount() {
    [ -d "/newroot$2" ] && mount -t "$1" -o "$3" "$1" "/newroot$2"
}
submount proc /proc nosuid,nodev,noexec || die "cannot mount /proc in the root filesystem"
submount sysfs /sys nosuid,nodev,noexec || echo "obd-init: no /sys in the root filesystem"
submount devtmpfs /dev nosuid,mode=0755 || die "cannot mount /dev in the root filesystem"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620 devpts /newroot/dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /newroot/dev/shm
if [ "$rw" = 0 ]; then
    submount tmpfs /tmp nosuid,nodev,mode=1777 || echo "obd-init: no /tmp in the root filesystem"
    submount tmpfs /run nosuid,nodev,mode=0755 || echo "obd-init: no /run in the root filesystem"
    [ -d /image ] && mount -o remount,ro /newroot
fi
hostname obd
read -r up _ </proc/uptime
echo "obd-init: uptime $up mounted"

[ -f /obd/cmd ] && spec=$(cat /obd/cmd)
[ -n "$spec" ] || die "no command (obd.cmd= is missing from the kernel command line)"
IFS=,
set -- $spec
unset IFS
[ "$1" = 1 ] || die "unknown command encoding version '$1'"
shift
[ "$#" -ge 3 ] || die "malformed command encoding (only $# fields)"
count=$# i=0
while [ "$i" -lt "$count" ]; do
    field=$1
    shift
    i=$((i + 1))
    if [ "$field" = - ]; then
        value=
    else
        # The trailing "." keeps trailing newlines, which command substitution would strip.
        value=$(printf '%s\n' "$field" | base64 -d && echo .) || die "malformed command field $i"
        value=${value%.}
    fi
    set -- "$@" "$value"
done
case $3 in '' | *[!0-9]*) die "malformed environment count '$3'" ;; esac

chroot /newroot sh /proc/1/root/init obd-inner "$nonce" "$@"
rc=$?

# Make everything the command wrote durable before reporting: unmount (or at least remount
# read-only) the root; processes the command left behind are killed first.
kill -9 -1 2>/dev/null
for m in /newroot/dev/shm /newroot/dev/pts /newroot/dev /newroot/run /newroot/tmp /newroot/sys /newroot/proc; do
    umount "$m" 2>/dev/null
done
sync
umount /newroot 2>/dev/null || mount -o remount,ro /newroot 2>/dev/null
sync
echo "OBD-EXIT-$nonce: $rc"
poweroff_now
