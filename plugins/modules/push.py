# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# This file holds the documentation only; the work is done by the action plugin of the same
# name on the controller (plugins/action/push.py).

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: push
short_description: Push large files and directory trees over SFTP with several connections per file
version_added: 0.1.0
description:
  - Copies O(src) from the controller to O(dest) on the target over SFTP, using a pool of
    O(connections) SSH connections to the host. Files larger than O(chunk_size) are split into
    ranges that are written in parallel, each at its offset of the remote file; small files travel
    whole. All files of the task share one work queue.
  - Each file is written to a temporary name in its destination directory (owner-only permissions),
    checked, given its mode and modification time, and renamed into place atomically
    (C(posix-rename@openssh.com)). A reader never sees a partial file under the final name.
    On a server without that extension whose plain rename refuses an existing name (SFTP version 3,
    as most servers other than OpenSSH's), the old file first moves aside to a temporary name, and there
    is then a moment with no file under that name, never a partial one.
  - One SSH stream carries at most one 2 MiB channel window per round trip; several connections
    lift that ceiling on long links and spread the encryption over several CPU cores.
  - Connection settings come from the host's variables as the C(ssh) connection plugin reads them
    (C(ansible_host), C(ansible_port), C(ansible_user), C(ansible_ssh_private_key_file),
    C(ansible_private_key_passphrase), C(ansible_password), C(ansible_ssh_common_args),
    C(ansible_ssh_extra_args)) and from the OpenSSH client configuration (C(-F file) in the ssh
    arguments, else C(~/.ssh/config) and C(/etc/ssh/ssh_config)), with OpenSSH's precedence, among them
    C(HostName), C(Port), C(User), C(IdentityFile), C(IdentitiesOnly), C(ProxyJump) (any number of
    hops), C(ProxyCommand), C(UserKnownHostsFile), C(StrictHostKeyChecking) (including
    C(accept-new)), C(ConnectTimeout), C(ServerAliveInterval), C(AddressFamily).
    Keys come from ssh-agent and identity files; passwords are used for password and
    keyboard-interactive authentication. See C(docs/connections.md) in the collection.
  - Host keys are checked against C(~/.ssh/known_hosts) (or the C(UserKnownHostsFile) of the ssh
    arguments or config) unless host key checking is off.
  - With C(become) (method C(sudo) only), every connection runs the target's C(sftp-server) through
    C(sudo -u <become_user>), so files are created and owned by the become user;
    C(ansible_become_password) is given to sudo on the connection, never on a command line.
  - The target needs only an SSH server with SFTP. With O(verify=checksum) or O(compare=checksum) the push
    hashes on the target where it can run Python; where the target runs no commands (an SFTP-only account,
    an appliance), it reads the written data back over SFTP instead, and says so in a warning.
  - Runs on the controller as an action plugin; requires the Python library C(paramiko) there.
author:
  - multipush.sftp developers (@multipush)
requirements:
  - paramiko >= 4.0 on the controller
  - optionally isal on the controller, for a faster CRC-32 (see RV(crc32_library))
options:
  src:
    description:
      - Local path of a file or a directory to push. A relative path is looked up in the role's or
        playbook's C(files/) directory, like M(ansible.builtin.copy).
      - For a directory, a trailing C(/) pushes its contents into O(dest); without it, the directory
        itself is created inside O(dest) (rsync's rule, as in M(ansible.builtin.copy)).
    type: str
    required: true
  dest:
    description:
      - Remote path. For a file O(src), the file path to write, or an existing directory (or a path
        ending in C(/)) to put the file into. For a directory O(src), the directory to push into.
      - Missing parent directories are created.
      - A relative path is relative to the login directory of the SSH user on the target (usually
        its home directory), as with C(scp) and C(sftp). RV(dest) in the result gives the absolute
        path it resolved to.
    type: str
    required: true
  connections:
    description:
      - How many SSH connections to the host the push uses, each owned by its own worker process.
      - C(auto) (the default) measures the path and grows the pool while it pays. The push starts
        with 2 connections, or 8 when the round trip timed at login is 20 ms or more (those 8 log in
        while the survey runs). On such a path a connection must also have a login's worth of work;
        the work's time on one stream (a 2 MiB window per round trip, three round trips per batch of
        small files) divided by the first login's time (which includes the target's session start)
        caps the pool, so a tree of some tens of MiB opens fewer than 8. Every half second or ten
        round trips, whichever is longer, it compares the rate of the whole pool with the rate
        before, and doubles the pool while a doubling raised the rate by at least 15% and the
        controller's CPUs were not busy (15% or more of their time idle; another connection is one
        more process on each end). When one did not, it goes back to the smaller pool, which was
        about as fast, and stays there. It never goes past O(max_connections) or the jobs left to
        hand out, and does not double when what is left would go out in less than two logins'
        time. Short paths (the CPUs of either end are the limit) settle on about 2; long ones with
        much to send grow to 8 or more, since one stream carries
        at most one 2 MiB channel window per round trip. RV(connections_reason) says what it chose
        and why; RV(round_trip_ms) is the round trip it measured.
      - A whole number fixes the count instead.
      - Either way the pool is sized by the work to send, after the survey. A push with nothing to
        send uses one connection. So does a small one (less than 1 MiB in at most 4 jobs).
      - Every connection is one sshd process on the target; see the C(multipush.sftp.sshd_tuning)
        role for raising the target's C(MaxStartups) when many run at once.
    type: raw
    default: auto
  max_connections:
    description:
      - The most connections O(connections=auto) grows to. Ignored when O(connections) is a number.
    type: int
    default: 16
  chunk_size:
    description:
      - Files larger than this are split into ranges of this size, sent in parallel.
      - C(auto) picks per file C(size / (connections * 4)), at least 16 MiB and at most 1 GiB, where
        C(connections) is O(max_connections) with O(connections=auto), so the pool can grow into the
        ranges.
      - A number of bytes or a number with a unit such as C(64M) or C(1G) (binary units); at least C(64K).
    type: str
    default: auto
  max_concurrent_handshakes:
    description:
      - At most this many connections are being set up at any instant. OpenSSH drops new connections
        at random beyond C(MaxStartups) (default 10) unauthenticated ones.
    type: int
    default: 8
  exclude:
    description:
      - Glob patterns (C(fnmatch)) of files and directories to leave out, matched against the path
        relative to O(src) and against the base name. An excluded directory is skipped whole.
    type: list
    elements: str
    default: []
  follow:
    description:
      - Follow symlinks in O(src) and push what they point to. When false, symlinks are recreated
        on the target as symlinks with the same target text.
      - Sockets, FIFOs and devices are never pushed; they are skipped with a warning.
    type: bool
    default: false
  compare:
    description:
      - How to decide that a remote file is already identical and skip it.
      - C(size_mtime) skips files with the same size and modification time (rsync's quick check).
      - C(checksum) compares digests (O(checksum_algorithm)) of files with the same size, so an edit
        that kept size and modification time is still found. Needs Python on the target.
    type: str
    choices: [size_mtime, checksum]
    default: size_mtime
  force:
    description:
      - When false, files that already exist on the target are never replaced, whatever their content.
    type: bool
    default: true
  verify:
    description:
      - How to check what was written before it is renamed into place.
      - C(checksum) compares the digest of every range, computed locally while the bytes are read for
        sending, with digests computed on the target in parallel, by the same code as
        M(multipush.sftp.verify), over one more SSH connection that the push opens for it (through the module when
        the task uses C(become) or the target's shell cannot start C(python3)). A mismatching range is
        sent again (at most twice), then the task fails naming the file.
      - A target that runs no commands (an SFTP-only account such as OpenSSH's C(ForceCommand internal-sftp),
        an appliance, an SFTP server that is not OpenSSH), or where the module cannot run, is found out at the
        first check, and the push then reads every written range back over its own SFTP connections and compares
        the digests on the controller, for the rest of the push, and says so in a warning. The copy is as
        verified as elsewhere; the cost is reading each checked byte back once (RV(remote_hashing.bytes_read)),
        which on a link-bound push adds up to the time of the download. Use O(verify=size) to skip it.
      - Small files (up to 1 MiB, sent several to a job) are read back instead, in the same pipeline that
        wrote them, and renamed into place by that job when what the target returns has the source's
        digest; no round trip, hashing service or module run is added for them. One that reads back
        different is checked the regular way.
      - C(size) checks the remote size. C(none) relies on SSH's integrity protection alone.
    type: str
    choices: [none, size, checksum]
    default: checksum
  whole_checksum:
    description:
      - With O(verify=checksum), also return the digest of every file split into ranges as a whole
        (what C(sha256sum) prints, with O(checksum_algorithm=sha256)) as RV(files[].checksum). That is one
        more full read and hash of each such file on the controller, beside the per-range digests that
        verification needs (measured on a 2-core controller, about 2.7 s of CPU per GiB with sha256).
      - Files sent whole always return their digest; it is computed while they are sent.
    type: bool
    default: false
  checksum_algorithm:
    description:
      - Digest used by O(verify=checksum) and O(compare=checksum), and reported in RV(files[].checksum).
      - C(crc32) (the default) is an error-detecting code, not a cryptographic hash. It finds corrupted,
        missing, stale or misplaced bytes, which is what the check after writing is for (SSH already
        authenticates every byte in transit), and it costs about a tenth of C(sha256) on CPUs without SHA
        instructions, on the controller and on the target. It does not stand against someone who edits
        files on purpose, and O(compare=checksum) with it misses a same-size edit with a chance of one
        in four billion.
      - Choose C(sha256) to get digests to compare with published checksums (C(sha256sum)) or when
        the check must hold against tampering.
    type: str
    choices: [crc32, md5, sha1, sha224, sha256, sha384, sha512, blake2b]
    default: crc32
  retries:
    description:
      - How many times a dropped connection or failed handshake is retried, with exponential backoff.
        The unfinished part of a range goes back on the queue for a fresh connection.
      - Authentication, host key, permission and "no space" errors are never retried.
    type: int
    default: 5
  retry_delay:
    description:
      - First backoff delay in seconds; it doubles with every retry (at most 30 s, with jitter).
    type: float
    default: 1.0
  timeout:
    description:
      - Seconds to wait for a connection, a handshake, or any reply of the target before the
        connection counts as lost.
    type: int
    default: 30
  request_size:
    description:
      - Largest SFTP write request. By default the largest the server allows through
        C(limits@openssh.com) (255 KiB on OpenSSH 8.5 and later), else 32 KiB.
      - A value above the server's limit is lowered to it.
    type: str
  temp_max_age:
    description:
      - Temporary files of this collection older than this many seconds in the destination
        directories are removed. Temporary files of another version of a file being pushed are
        removed once nothing has written to them for two minutes.
      - The temporary file of the same source version is never removed but resumed. It is compared with
        the source block by block (1 MiB blocks; larger for files of more than 16 GiB, so that there are at
        most 16384) and only the blocks that differ are sent, so a push killed part-way sends again what had
        not landed and at most one part-written block per connection. The comparison hashes on the target
        where it can run Python, and reads the temp file back over SFTP where it cannot.
    type: int
    default: 86400
  progress_interval:
    description:
      - Seconds between progress lines in the C(ansible-playbook) output (overall percent, bytes, rate,
        ETA, files done of total), shown for transfers that last longer than that. With C(-v), a line
        per finished file too. A summary line closes every push. C(0) turns all of them off.
    type: float
    default: 5.0
  owner:
    description:
      - Name or number of the user that should own the pushed files and directories, as for
        M(ansible.builtin.copy). Names are looked up in the target's C(/etc/passwd) (read over SFTP).
      - Giving files to another user needs root on the target, so use C(become). Without it the task
        fails before writing when the owner differs from the user who writes the files.
      - Applied when a file or directory is written or its mode and time are set; an unchanged file
        that is skipped keeps its current owner.
    type: str
  group:
    description:
      - Name or number of the group of the pushed files and directories. Names are looked up in the
        target's C(/etc/group). Without C(become), the writing user must be a member of the group.
    type: str
  sftp_server:
    description:
      - Path of the C(sftp-server) program on the target, run through C(sudo) when the task uses
        C(become). By default the first that exists of the usual places
        (C(/usr/lib/openssh/sftp-server), C(/usr/libexec/openssh/sftp-server), C(/usr/lib/ssh/sftp-server),
        C(/usr/libexec/sftp-server) and a few more).
    type: str
  result_file:
    description:
      - Path on the controller where the task's result is written as JSON, also when the push fails or the
        host is unreachable (then with C(failed) or C(unreachable) and C(msg)). Missing directories are
        created; the file is replaced atomically, so a pipeline reading it never sees half a file.
      - Costs a few milliseconds, where writing the registered result with M(ansible.builtin.copy) on
        C(localhost) costs two module runs (seconds).
    type: path
  bandwidth_limit:
    description:
      - The most this host's push sends per second, all its connections together (like C(scp -l),
        C(rsync --bwlimit) and C(mscp -L)). With O(fanout), also the most a peer sends to this host.
      - Bytes per second with an optional unit, V(100M) (MiB/s, binary like the other sizes), V(50MB)
        (decimal), or bits per second, V(800Mbit). Unset means no limit.
      - Held within 5% over any 5 seconds; the limit shows in the progress lines and the result.
    type: str
  total_bandwidth_limit:
    description:
      - The most the controller sends per second for this task, all hosts and forks together, the
        controller's uplink budget. Bytes a peer sends with O(fanout) do not count against it.
      - Same units as O(bandwidth_limit). Unset means no limit.
    type: str
  fanout:
    description:
      - Hosts that hold a verified copy pass it on. A host still waiting is fed by a host that
        completed (a peer) when one can, so the controller's uplink carries the tree about once per
        O(fanout_group) instead of once per host.
      - A host also passes on its copy while it is still receiving it, range by range as its writes
        are acknowledged, so the copies flow down a tree of hosts at once and the controller's first
        copy overlaps the whole cascade.
      - The peer runs a sender shipped by the collection (Python standard library and its OpenSSH
        client) that writes this host's temp files over several SSH connections; the controller
        then checks every block against the source, sends any that differ, and puts the files in
        place as in a plain push. Each host reports which source fed it in RV(source).
      - Peers log in to each other with a forwarded SSH agent holding only the key files this push
        uses (a temporary agent on the controller), and check each other's host keys against what
        the controller verified. No key or credential is written on any host. See
        docs/connections.md, "Fan-out".
      - Peers reach a host at its C(multipush_peer_address) host variable (V(host) or V(host:port)),
        by default its C(ansible_host) and C(ansible_port). A host no peer can reach is fed by the
        controller, with a warning naming the host and address.
      - With one host, or V(false), a plain push.
    type: bool
    default: false
  fanout_per_source:
    description:
      - How many hosts one source feeds at once with O(fanout).
    type: int
    default: 2
  fanout_group:
    description:
      - With O(fanout), copies stay within hosts of the same group, for example a site given as
        C("{{ site }}"). The controller seeds each group and peers feed only their own group, so a
        WAN link is crossed once per group. Unset, all hosts of the task are one group.
    type: str
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
attributes:
  action:
    support: full
  async:
    support: none
  bypass_host_loop:
    support: none
  check_mode:
    support: full
    details: Reports the files that would be sent (status C(would_send)) and sends nothing.
  diff_mode:
    support: partial
    details: Lists the files that would be added or changed, not their contents.
  platform:
    support: full
    platforms: posix
  safe_file_operations:
    description: Writes to a temporary file and renames it into place atomically.
    support: full
  vault:
    description: Whether the source files can be vault-encrypted files that are decrypted on the fly.
    support: none
notes:
  - Permission bits and modification times of files, and of the directories the push creates, are kept
    from O(src); ownership is that of the SSH user, or of the become user with C(become), unless O(owner)
    and O(group) say otherwise.
  - Directories that exist already keep their own mode, owner, group and modification time, O(dest) itself
    included, as with M(ansible.builtin.copy); a push into C(/tmp) leaves C(/tmp) as it was. Adding files
    to a directory moves its modification time as any write does; a run with nothing to send changes nothing.
  - A symlink to a directory, as O(dest) (C(current -> releases/42)) or inside it, is written through; files
    land in its target and the link stays. A symlink that dangles or points to a file where a directory is
    needed fails the task, naming it. A symlink where a regular file is to be written, O(dest) included, is
    replaced by the file (never the file it points to), as copy does; with O(force=false) it is left alone.
  - 'Differences from M(ansible.builtin.copy), each on purpose (the same list is in C(docs/usage.md)):'
  - (1) Modes and modification times come from O(src), for files and created directories (a mirror, as
    C(rsync -a); the kept mtime is what the quick check compares). Copy uses the target's default mode
    and sets no mtime. No option gives copy's behaviour; change modes afterwards with M(ansible.builtin.file).
  - (2) Symlinks in O(src) are pushed as symlinks, where copy follows them (C(local_follow)); the tree stays
    the same tree and nothing outside O(src) travels. O(follow=true) gives copy's behaviour.
  - (3) Missing parent directories of O(dest) are created (mode 0755, with O(owner) and O(group)), so one
    task pushes to a fresh host; copy fails for a file pushed into a missing directory. No option; check the
    parent with M(ansible.builtin.stat) first where a missing one must fail.
  - (4) An existing file with the same size and modification time is skipped without being read (rsync's
    quick check; RV(files[].reason) C(same size and mtime)), where copy compares checksums; reading a large
    tree on both ends takes minutes, a listing does not. An edit that kept both size and mtime is therefore
    not sent; O(compare=checksum) finds it, as copy would.
  - Every connection authenticates on its own; through a jump host, each one is also a connection to
    the jump host. With C(forks) hosts pushed at once, the controller opens up to
    C(forks x connections) connections, and a shared jump host carries all of them.
  - Temporary files are named C(.<name>.<token>.multipush.tmp) in the destination directory.
seealso:
  - module: multipush.sftp.verify
  - module: ansible.builtin.copy
  - module: ansible.posix.synchronize
"""

EXAMPLES = r"""
- name: Push a vPod directory (its contents); the push finds how many connections pay
  multipush.sftp.push:
    src: /hol/lib/my-vpod/
    dest: /hol/lib/my-vpod-copy
  register: pushed

- name: Push one large image with 16 connections and 64 MiB ranges, checking sizes only
  multipush.sftp.push:
    src: /images/disk1.vmdk
    dest: /srv/images/
    connections: 16
    chunk_size: 64M
    verify: size

- name: Push, and leave each host's result as JSON on the controller for a pipeline
  multipush.sftp.push:
    src: /hol/lib/my-vpod/
    dest: /srv/vpods/my-vpod
    result_file: "/srv/vpods/results/{{ inventory_hostname }}.json"

- name: Re-send files whose content differs even when size and mtime match
  multipush.sftp.push:
    src: configs/
    dest: /etc/myapp/
    compare: checksum
    exclude:
      - "*.swp"
      - ".git"
"""

RETURN = r"""
changed:
  description: Whether anything was written, created or changed on the target.
  returned: always
  type: bool
dest:
  description:
    - O(dest) as an absolute path on the target. A relative O(dest) is resolved against the SSH user's
      login directory (asked of the target's SFTP server).
  returned: always
  type: str
  sample: /home/hol-mgr/my-vpod-copy
summary:
  description:
    - One line for people, in the units of the progress lines (sizes and rates in binary units,
      KiB, MiB, GiB). What was sent, resumed and skipped, bytes, time, rate and retries; in check
      mode what would be sent.
  returned: always
  type: str
  sample: "52 sent, 0 skipped, 577.5 MiB in 4.1 s (140.4 MiB/s), 0 retries"
links:
  description: One entry per symlink of O(src) (recreated as a symlink when O(follow=false)).
  returned: always
  type: list
  elements: dict
  contains:
    dest:
      description: Remote path of the link.
      type: str
    target:
      description: What the link points to (as read from the source link).
      type: str
    status:
      description:
        - C(created), C(changed) (it pointed elsewhere, or something else was there), C(unchanged); in
          check mode C(would_create), C(would_change) or C(unchanged).
      type: str
  sample:
    - dest: /hol/lib/my-vpod-copy/current
      target: releases/42
      status: created
files:
  description: One entry per regular file of O(src).
  returned: always
  type: list
  elements: dict
  contains:
    src:
      description: Local path.
      type: str
    dest:
      description: Remote path.
      type: str
    size:
      description: Size in bytes.
      type: int
    status:
      description:
        - C(sent), C(resent) (sent again after a verification mismatch), C(resumed) (an interrupted
          earlier run's temporary file was completed), C(skipped), or in check mode C(would_send).
      type: str
    reason:
      description:
        - Why it was sent, C(new) (not on the target), C(size), C(mtime) or C(checksum) (that differed),
          C(type) (a symlink or another non-regular file stood there and is replaced).
        - Or why it was skipped, C(same size and mtime) (the quick check of O(compare=size_mtime); the
          content was not read, so use O(compare=checksum) to find an edit that kept both),
          C(same checksum) (O(compare=checksum)), C(exists) (O(force=false)).
      type: str
    bytes_sent:
      description: Bytes written for this file, including re-sent ranges.
      type: int
    seconds:
      description: Wall-clock seconds from the first write to the rename.
      type: float
    retries:
      description: Ranges or steps of this file that had to be retried on a fresh connection.
      type: int
    checksum:
      description:
        - Digest (O(checksum_algorithm), hexadecimal) of the file on the target, verified against the source
          (O(verify=checksum) only). For a
          file split into ranges only with O(whole_checksum=true) (every range was verified by digest
          either way); null otherwise.
      type: str
    ranges:
      description: Number of ranges the file was split into (1 for a file sent whole).
      type: int
    chunk_size:
      description: Range size used for this file, in bytes.
      type: int
  sample:
    - src: /hol/lib/my-vpod/disk1.vmdk
      dest: /hol/lib/my-vpod-copy/disk1.vmdk
      size: 1073741824
      status: sent
      reason: new
      bytes_sent: 1073741824
      seconds: 9.8
      retries: 0
      checksum: 3f4b...
      ranges: 32
      chunk_size: 33554432
files_sent:
  description: Number of files sent (including re-sent ones).
  returned: always
  type: int
files_skipped:
  description: Number of files already identical on the target (or kept because O(force=false)).
  returned: always
  type: int
files_total:
  description: Number of regular files in O(src).
  returned: always
  type: int
dirs_created:
  description: Directories created on the target.
  returned: always
  type: int
temps_removed:
  description: Stale temporary files removed (see O(temp_max_age)).
  returned: always
  type: int
links_changed:
  description: Symlinks created or corrected on the target.
  returned: always
  type: int
bytes_sent:
  description: Bytes written to the target in total.
  returned: always
  type: int
seconds:
  description: Duration of the whole push, including the survey of the target.
  returned: always
  type: float
throughput_mb_s:
  description: RV(bytes_sent) divided by RV(seconds), in MB/s (10^6 bytes).
  returned: always
  type: float
connections:
  description:
    - SSH connections opened for the transfer (the one for hashing on the target not counted),
      a connection that replaced a lost one included.
  returned: always
  type: int
connections_reason:
  description:
    - Why the pool had the size it had. With O(connections=auto) this gives the rate it measured
      at each size it tried and where it settled. With a number, whether there was work for all of
      them.
  returned: always
  type: str
  sample: "auto: 8->16 +4%: back to 8 (4: 152 MiB/s, 8: 261 MiB/s, 16: 271 MiB/s); round trip 50.3 ms"
source:
  description:
    - Where this host's copy came from with O(fanout). V(controller), or the inventory name of the
      peer that sent the data (the controller still checked and placed it). V(controller) without
      O(fanout).
  returned: always
  type: str
  sample: vpod-host-03
fanout:
  description:
    - With O(fanout), how this host got its copy.
  returned: when O(fanout) is true and not in check mode
  type: dict
  contains:
    source:
      description: As RV(source).
      type: str
    group:
      description: O(fanout_group) of this host (empty when unset).
      type: str
    waited_seconds:
      description: How long the host waited for a source.
      type: float
    peer_bytes:
      description: Bytes a peer wrote to this host's temp files (all checked against the source afterwards).
      type: int
    attempts:
      description:
        - Each peer feed, with V(source), and V(files) and V(seconds) when it completed or V(failed) with why.
        - V(connections) is the most SSH connections the peer had open to this host. A peer starts with one and
          adds more (four at most) while each one added raised its rate and its CPUs had a core idle.
        - V(streamed) is true when the peer was itself still receiving the tree and passed it on as it came.
      type: list
      elements: dict
bandwidth_limit:
  description:
    - The limits this push ran under, in bytes per second (V(null) for none).
  returned: always
  type: dict
  contains:
    host:
      description: O(bandwidth_limit) in bytes per second.
      type: float
    total:
      description: O(total_bandwidth_limit) in bytes per second.
      type: float
round_trip_ms:
  description:
    - The round trip of the SSH path in milliseconds, jump hosts included, timed right after login
      with a request the server answers without acting on it (as C(ssh)'s C(ServerAliveInterval)
      does); the shortest when several connections timed it.
    - V(null) when no connection timed it (nothing to do, or the server did not answer in time).
  returned: always
  type: float
handshake_retries:
  description: Connection attempts that failed and were retried (for example dropped by C(MaxStartups)).
  returned: always
  type: int
retries:
  description: All retries of the task, handshakes and transfer steps.
  returned: always
  type: int
write_size:
  description: SFTP write request size used, in bytes.
  returned: always
  type: int
cipher:
  description: SSH cipher negotiated with the target (AES-GCM is preferred when offered).
  returned: when a connection was opened
  type: str
  sample: aes128-gcm@openssh.com
crc32_library:
  description:
    - The CRC-32 implementation the controller used for O(checksum_algorithm=crc32). C(isal) (the
      C(isal) Python package, from requirements.txt, about six times faster than zlib here) when it is
      installed on the controller, C(zlib) otherwise. Targets always use zlib (standard library only);
      both compute the same values.
  returned: always
  type: str
  sample: isal
phases:
  description:
    - Seconds spent in each step of the push, in the order they ran. C(connect) until the first connection
      was up; C(survey) listing the target; C(directories) creating missing ones; C(transfer) sending,
      verifying and putting files in place; C(directory_attributes) setting directory modes and mtimes.
  returned: always
  type: dict
  sample: {"connect": 0.85, "survey": 0.11, "directories": 0.05, "transfer": 3.2, "directory_attributes": 0.1}
remote_hashing:
  description: Hashing on the target for O(verify=checksum) and O(compare=checksum).
  returned: always
  type: dict
  contains:
    calls:
      description: Number of hashing calls made on the target.
      type: int
    seconds:
      description: Their summed duration (they overlap with the transfer).
      type: float
    via:
      description:
        - How the last check was made. C(ssh) over the push's connection for hashing, C(module) through
          M(multipush.sftp.verify), C(sftp) by reading the bytes back over the push's SFTP connections (a target
          that runs no commands), or null when nothing was checked on the target.
      type: str
    bytes_read:
      description: Bytes read back over SFTP for checks (non-zero only with RV(remote_hashing.via=sftp)).
      type: int
  sample: {"calls": 3, "seconds": 1.2, "via": "ssh", "bytes_read": 0}
"""
