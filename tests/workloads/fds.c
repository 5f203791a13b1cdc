/*
 * fds: descriptors of many kinds, each checked every tick.
 *
 * usage: fds
 *
 * Works in its current directory (the test's temporary directory). Set-up:
 *   - dir:     creates dents/ with DENTS files f000..f299 and opens it
 *              (O_RDONLY|O_DIRECTORY); reads it a few entries per tick with
 *              getdents64, so its position is mid-way most of the time;
 *   - urandom: /dev/urandom, O_RDONLY|O_CLOEXEC;
 *   - zero:    /dev/zero, O_RDONLY;
 *   - append:  append.dat, O_WRONLY|O_CREAT|O_TRUNC|O_APPEND, and a second,
 *              read-only descriptor `appr` of the same file;
 *   - pipe:    a pipe whose both ends are O_NONBLOCK;
 *   - dup:     dup.dat opened O_RDWR|O_CREAT|O_TRUNC as `dupa`, and dup2(dupa, 42)
 *              as `dupb`: one open file description, one shared offset.
 * Each tick:
 *   - dir: lseek(dir, 0, SEEK_CUR) must be where the last getdents64 left it; read
 *     the next few entries. In the first pass every name must be new, and at the
 *     end of the pass all DENTS + 2 names (with . and ..) must have been seen; in
 *     later passes the entries must come in exactly the order of the first pass.
 *     At the end of a pass it seeks back to 0 and starts the next pass;
 *   - urandom: 16 bytes, not all zero and not the previous 16; FD_CLOEXEC still set;
 *   - zero: 256 bytes, all zero;
 *   - append: seeks `append` to 0, then writes a 16-byte record; the record must
 *     land at the end (size and offset 16 n, pread through `appr` reads it back):
 *     without O_APPEND it would overwrite the first record; F_GETFL shows O_APPEND;
 *   - pipe: F_GETFL shows O_NONBLOCK on both ends; a read of the empty pipe must
 *     fail with EAGAIN (a blocking pipe would hang here); one byte written is read
 *     back, and the pipe is empty again;
 *   - dup: writes an 8-byte record through dupa on odd ticks and through dupb on
 *     even ticks; both offsets must then be 8 n, and the file holds records
 *     1..n in order (pread).
 * and prints
 *   tick <n> <chain> pass <dir pass> idx <entries read this pass> appended <n>
 * Its first line names the descriptors:
 *   fds dir D urandom U zero Z append A appr R pipe PR PW dupa X dupb Y
 */
#include "common.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#define DENTS 300
#define NAMES (DENTS + 2)
#define NAME_MAX_ 16
#define DUPB 42

struct linux_dirent64 {
	uint64_t d_ino;
	int64_t d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

static char order[NAMES][NAME_MAX_];
static int seen[NAMES];

/* Index of a name of dents/: 0 ".", 1 "..", 2 + i "f<i>"; -1 if none. */
static int name_index(const char *name)
{
	if (strcmp(name, ".") == 0)
		return 0;
	if (strcmp(name, "..") == 0)
		return 1;
	if (name[0] == 'f' && strlen(name) == 4) {
		int i = atoi(name + 1);
		if (i >= 0 && i < DENTS)
			return 2 + i;
	}
	return -1;
}

static int open_or_die(const char *path, int flags)
{
	int fd = open(path, flags, 0644);
	if (fd < 0) {
		FAIL("open %s: %s", path, strerror(errno));
		exit(1);
	}
	return fd;
}

int main(void)
{
	if (mkdir("dents", 0755) < 0 && errno != EEXIST) {
		FAIL("mkdir dents: %s", strerror(errno));
		return 1;
	}
	for (int i = 0; i < DENTS; i++) {
		char p[32];
		snprintf(p, sizeof p, "dents/f%03d", i);
		close(open_or_die(p, O_WRONLY | O_CREAT | O_TRUNC));
	}
	int dir = open_or_die("dents", O_RDONLY | O_DIRECTORY);
	int ur = open_or_die("/dev/urandom", O_RDONLY | O_CLOEXEC);
	int zero = open_or_die("/dev/zero", O_RDONLY);
	int app = open_or_die("append.dat", O_WRONLY | O_CREAT | O_TRUNC | O_APPEND);
	int appr = open_or_die("append.dat", O_RDONLY);
	int pp[2];
	if (pipe2(pp, O_NONBLOCK) < 0) {
		FAIL("pipe2: %s", strerror(errno));
		return 1;
	}
	int dupa = open_or_die("dup.dat", O_RDWR | O_CREAT | O_TRUNC);
	if (dup2(dupa, DUPB) != DUPB) {
		FAIL("dup2: %s", strerror(errno));
		return 1;
	}
	int dupb = DUPB;
	emit("fds dir %d urandom %d zero %d append %d appr %d pipe %d %d dupa %d dupb %d", dir, ur,
	     zero, app, appr, pp[0], pp[1], dupa, dupb);

	struct ticker t = { 0, 0 };
	uint64_t pass = 1;
	int idx = 0;
	off_t dir_pos = 0;
	unsigned char last_rand[16] = { 0 };

	for (;;) {
		uint64_t n = t.n + 1;

		/* Directory. */
		off_t now = lseek(dir, 0, SEEK_CUR);
		if (now != dir_pos)
			FAIL("dir: position %lld, expected %lld (pass %llu, %d entries read)",
			     (long long)now, (long long)dir_pos, (unsigned long long)pass, idx);
		char dbuf[4 * 32]; /* room for about four entries */
		long got = syscall(SYS_getdents64, dir, dbuf, sizeof dbuf);
		if (got < 0) {
			FAIL("dir: getdents64: %s", strerror(errno));
		} else if (got == 0) {
			if (idx != NAMES)
				FAIL("dir: pass %llu ended after %d entries, expected %d",
				     (unsigned long long)pass, idx, NAMES);
			pass++;
			idx = 0;
			memset(seen, 0, sizeof seen);
			if (lseek(dir, 0, SEEK_SET) != 0)
				FAIL("dir: rewind: %s", strerror(errno));
		} else {
			for (long off = 0; off < got;) {
				struct linux_dirent64 *d = (struct linux_dirent64 *)(dbuf + off);
				off += d->d_reclen;
				int k = name_index(d->d_name);
				if (k < 0) {
					FAIL("dir: unexpected entry %s", d->d_name);
					continue;
				}
				if (seen[k])
					FAIL("dir: entry %s seen twice in pass %llu (at %d)", d->d_name,
					     (unsigned long long)pass, idx);
				seen[k] = 1;
				if (idx >= NAMES) {
					FAIL("dir: more than %d entries in pass %llu", NAMES,
					     (unsigned long long)pass);
				} else if (pass == 1) {
					snprintf(order[idx], NAME_MAX_, "%s", d->d_name);
				} else if (strcmp(order[idx], d->d_name) != 0) {
					FAIL("dir: pass %llu entry %d is %s, pass 1 had %s",
					     (unsigned long long)pass, idx, d->d_name, order[idx]);
				}
				idx++;
			}
		}
		dir_pos = lseek(dir, 0, SEEK_CUR);

		/* /dev/urandom. */
		unsigned char rnd[16];
		if (read(ur, rnd, sizeof rnd) != (ssize_t)sizeof rnd) {
			FAIL("urandom: read: %s", strerror(errno));
		} else {
			static const unsigned char zeros[16];
			if (memcmp(rnd, zeros, sizeof rnd) == 0 || memcmp(rnd, last_rand, sizeof rnd) == 0)
				FAIL("urandom: 16 bytes that are all zero or a repeat");
			memcpy(last_rand, rnd, sizeof rnd);
		}
		if (!(fcntl(ur, F_GETFD) & FD_CLOEXEC))
			FAIL("urandom: FD_CLOEXEC lost");

		/* /dev/zero. */
		unsigned char zb[256];
		memset(zb, 0xff, sizeof zb);
		if (read(zero, zb, sizeof zb) != (ssize_t)sizeof zb) {
			FAIL("zero: read: %s", strerror(errno));
		} else {
			for (size_t i = 0; i < sizeof zb; i++)
				if (zb[i] != 0) {
					FAIL("zero: byte %zu is %#x", i, zb[i]);
					break;
				}
		}

		/* O_APPEND. */
		if (!(fcntl(app, F_GETFL) & O_APPEND))
			FAIL("append: O_APPEND lost (flags %#o)", fcntl(app, F_GETFL));
		char rec[17], back[16];
		snprintf(rec, sizeof rec, "app %010llu.\n", (unsigned long long)n);
		lseek(app, 0, SEEK_SET);
		write_all(app, rec, 16);
		struct stat st;
		fstat(app, &st);
		off_t apos = lseek(app, 0, SEEK_CUR);
		if (st.st_size != (off_t)(16 * n) || apos != (off_t)(16 * n))
			FAIL("append: after record %llu the file is %lld bytes and the offset %lld, "
			     "expected %llu", (unsigned long long)n, (long long)st.st_size,
			     (long long)apos, (unsigned long long)(16 * n));
		if (pread(appr, back, 16, (off_t)(16 * (n - 1))) != 16 || memcmp(back, rec, 16) != 0)
			FAIL("append: record %llu is not at offset %llu", (unsigned long long)n,
			     (unsigned long long)(16 * (n - 1)));
		if (pread(appr, back, 16, 0) != 16 || memcmp(back, "app 0000000001.\n", 16) != 0)
			FAIL("append: the first record was overwritten");

		/* Non-blocking pipe. */
		if (!(fcntl(pp[0], F_GETFL) & O_NONBLOCK) || !(fcntl(pp[1], F_GETFL) & O_NONBLOCK))
			FAIL("pipe: O_NONBLOCK lost (read end %#o, write end %#o)",
			     fcntl(pp[0], F_GETFL), fcntl(pp[1], F_GETFL));
		char c = (char)n, cb;
		if (read(pp[0], &cb, 1) != -1 || errno != EAGAIN)
			FAIL("pipe: reading the empty pipe did not fail with EAGAIN");
		if (write(pp[1], &c, 1) != 1)
			FAIL("pipe: write: %s", strerror(errno));
		if (read(pp[0], &cb, 1) != 1 || cb != c)
			FAIL("pipe: did not read back the byte written");
		if (read(pp[0], &cb, 1) != -1 || errno != EAGAIN)
			FAIL("pipe: not empty after reading back the byte");

		/* dup: one description, one offset. */
		int via = (n & 1) ? dupa : dupb;
		uint64_t word = chain_step(n, 0xD0B);
		write_all(via, &word, 8);
		off_t pa = lseek(dupa, 0, SEEK_CUR), pb = lseek(dupb, 0, SEEK_CUR);
		if (pa != (off_t)(8 * n) || pb != (off_t)(8 * n))
			FAIL("dup: offsets %lld (fd %d) and %lld (fd %d) after %llu records, expected %llu",
			     (long long)pa, dupa, (long long)pb, dupb, (unsigned long long)n,
			     (unsigned long long)(8 * n));
		uint64_t first;
		if (pread(dupa, &first, 8, 0) != 8 || first != chain_step(1, 0xD0B))
			FAIL("dup: the first record was overwritten");
		uint64_t prev;
		if (n > 1 && (pread(dupb, &prev, 8, (off_t)(8 * (n - 2))) != 8 ||
			      prev != chain_step(n - 1, 0xD0B)))
			FAIL("dup: record %llu is missing", (unsigned long long)(n - 1));

		ticker_next(&t);
		emit("tick %llu %016llx pass %llu idx %d appended %llu", (unsigned long long)n,
		     (unsigned long long)t.chain, (unsigned long long)pass, idx,
		     (unsigned long long)n);
		sleep_ms(10);
	}
}
