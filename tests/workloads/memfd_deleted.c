/*
 * memfd_deleted: a process holding a deleted file and memfds, by descriptor and
 * by mapping, as Open MPI holds its /dev/shm probe and as programs hold sealed
 * memfds.
 *
 * usage: memfd_deleted DIR
 *
 * Made at start:
 *   - DIR/deleted-<pid>: 64 KiB, mode 0604, pattern A written, mapped shared, then
 *     unlinked; the descriptor (fd D) stays open at offset 100;
 *   - a second deleted file DIR/probe-<pid> of 4 KiB, held by a descriptor only
 *     (Open MPI's probe), with a line of text;
 *   - memfd "ckpt-ring": 128 KiB, mapped shared, sealed F_SEAL_SHRINK|F_SEAL_GROW;
 *   - memfd "ckpt-ro": 8 KiB of pattern B, sealed F_SEAL_WRITE|F_SEAL_SHRINK|
 *     F_SEAL_GROW|F_SEAL_SEAL, mapped read-only shared, held by its descriptor;
 *   - a memfd made without MFD_ALLOW_SEALING (so sealed F_SEAL_SEAL), held by a
 *     descriptor only, with a counter at offset 0 written with pwrite.
 * Each tick increments counters in the deleted file's mapping and in ckpt-ring's,
 * the memfd counter by pread/pwrite, and checks: the deleted file reads the same
 * through the descriptor as through the mapping, its mode and offset, every seal
 * set (F_GET_SEALS), the memfds' names (/proc/self/fd), ckpt-ro's content, that
 * a write to ckpt-ro fails (EPERM) and a resize of ckpt-ring fails; then prints
 *   tick <n> <chain> deleted <count> ring <count> fdonly <count>
 */
#include "common.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define DSIZE (64UL << 10)
#define RSIZE (128UL << 10)
#define ROSIZE (8UL << 10)

static int seals_of(int fd)
{
	return fcntl(fd, F_GET_SEALS);
}

static void check_name(int fd, const char *want)
{
	char p[64], link[256] = { 0 };
	snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
	if (readlink(p, link, sizeof link - 1) < 0 || strstr(link, want) == NULL)
		FAIL("fd %d is %s, expected %s", fd, link, want);
}

int main(int argc, char **argv)
{
	const char *dir = argc > 1 ? argv[1] : "/dev/shm";
	char path[512];
	snprintf(path, sizeof path, "%s/deleted-%d", dir, (int)getpid());
	int d = open(path, O_RDWR | O_CREAT | O_EXCL, 0604);
	if (d < 0 || ftruncate(d, DSIZE) < 0) {
		FAIL("%s: %s", path, strerror(errno));
		return 1;
	}
	fchmod(d, 0604);
	uint64_t *dm = mmap(NULL, DSIZE, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
	for (uint64_t j = 0; j < DSIZE / 8; j++)
		dm[j] = chain_step(0xD, j);
	dm[0] = 0;
	unlink(path);
	lseek(d, 100, SEEK_SET);

	snprintf(path, sizeof path, "%s/probe-%d", dir, (int)getpid());
	int probe = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
	const char text[] = "open_mpi probe\n";
	if (probe < 0 || write(probe, text, sizeof text - 1) != sizeof text - 1) {
		FAIL("%s: %s", path, strerror(errno));
		return 1;
	}
	unlink(path);

	int ring = memfd_create("ckpt-ring", MFD_ALLOW_SEALING);
	ftruncate(ring, RSIZE);
	uint64_t *rm = mmap(NULL, RSIZE, PROT_READ | PROT_WRITE, MAP_SHARED, ring, 0);
	for (uint64_t j = 1; j < RSIZE / 8; j++)
		rm[j] = chain_step(0xE, j);
	if (fcntl(ring, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0)
		FAIL("seal ckpt-ring: %s", strerror(errno));

	int ro = memfd_create("ckpt-ro", MFD_ALLOW_SEALING);
	ftruncate(ro, ROSIZE);
	for (uint64_t j = 0; j < ROSIZE / 8; j++) {
		uint64_t v = chain_step(0xF, j);
		pwrite(ro, &v, 8, j * 8);
	}
	int ro_seals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
	if (fcntl(ro, F_ADD_SEALS, ro_seals) < 0)
		FAIL("seal ckpt-ro: %s", strerror(errno));
	const uint64_t *rom = mmap(NULL, ROSIZE, PROT_READ, MAP_SHARED, ro, 0);
	if (rom == MAP_FAILED)
		FAIL("map ckpt-ro: %s", strerror(errno));

	int plain = memfd_create("ckpt-plain", 0);
	uint64_t zero = 0;
	pwrite(plain, &zero, 8, 0);

	emit("memfd_deleted pid %d deleted fd %d probe fd %d ring fd %d ro fd %d plain fd %d",
	     (int)getpid(), d, probe, ring, ro, plain);
	struct ticker t = { 0, 0 };
	for (;;) {
		dm[0]++;
		rm[0]++;
		uint64_t c = 0;
		pread(plain, &c, 8, 0);
		c++;
		pwrite(plain, &c, 8, 0);

		uint64_t via = 0;
		if (pread(d, &via, 8, 0) != 8 || via != dm[0])
			FAIL("deleted file: descriptor reads %llu, mapping %llu",
			     (unsigned long long)via, (unsigned long long)dm[0]);
		if (pread(d, &via, 8, 4096) != 8 || via != chain_step(0xD, 512))
			FAIL("deleted file: page 1 lost its pattern");
		struct stat st;
		if (fstat(d, &st) < 0 || (st.st_mode & 07777) != 0604 || st.st_nlink != 0 ||
		    st.st_size != (off_t)DSIZE)
			FAIL("deleted file: mode %o links %ld size %lld", st.st_mode & 07777,
			     (long)st.st_nlink, (long long)st.st_size);
		if (lseek(d, 0, SEEK_CUR) != 100)
			FAIL("deleted file: offset %lld", (long long)lseek(d, 0, SEEK_CUR));
		char buf[32] = { 0 };
		if (pread(probe, buf, sizeof text - 1, 0) != sizeof text - 1 || strcmp(buf, text) != 0)
			FAIL("probe: reads '%s'", buf);
		if (rm[RSIZE / 8 - 1] != chain_step(0xE, RSIZE / 8 - 1))
			FAIL("ckpt-ring lost its last word");
		if (seals_of(ring) != (F_SEAL_SHRINK | F_SEAL_GROW))
			FAIL("ckpt-ring seals %x", seals_of(ring));
		if (seals_of(ro) != ro_seals)
			FAIL("ckpt-ro seals %x, expected %x", seals_of(ro), ro_seals);
		if (seals_of(plain) != F_SEAL_SEAL)
			FAIL("ckpt-plain seals %x", seals_of(plain));
		if (ftruncate(ring, RSIZE * 2) == 0)
			FAIL("ckpt-ring grew past its seal");
		if (pwrite(ro, &c, 8, 0) != -1 || errno != EPERM)
			FAIL("ckpt-ro took a write past its seal");
		for (uint64_t j = 0; j < ROSIZE / 8; j += 97)
			if (rom[j] != chain_step(0xF, j))
				FAIL("ckpt-ro word %llu", (unsigned long long)j);
		check_name(ring, "memfd:ckpt-ring");
		check_name(ro, "memfd:ckpt-ro");
		check_name(plain, "memfd:ckpt-plain");
		uint64_t n = ticker_next(&t);
		emit("tick %llu %016llx deleted %llu ring %llu fdonly %llu", (unsigned long long)n,
		     (unsigned long long)t.chain, (unsigned long long)dm[0], (unsigned long long)rm[0],
		     (unsigned long long)c);
		sleep_ms(20);
	}
}
