/*
 * A libdlm user as lvmlockd is (lvm2's daemons/lvmlockd/lvmlockd-dlm.c):
 * the same calls with the same flags, on libdlm_lt, driven by commands on
 * stdin so that a test can run it on several nodes in turn. One line out
 * per command. Built against Debian's libdlm-dev header, linked -ldlm_lt.
 *
 *   version                 dlm_kernel_version
 *   join LS                 dlm_new_lockspace(LS, 0600, DLM_LSFL_NEWEXCL), or open it if it exists
 *   open LS                 dlm_open_lockspace (lvmlockd, adopting after a restart)
 *   create R VALBLK         NL request with EXPEDITE (and VALBLK for a VG/GL lock): the resource's lock
 *   lock R PR|EX            conversion with NOQUEUE|PERSISTENT (and VALBLK): "busy" on EAGAIN
 *   version-of R N          the r_version to write when R's EX lock is released
 *   unlock R                conversion to NL (from EX with VALBLK, writing the value block)
 *   adopt R PR|EX           dlm_ls_lockx with PERSISTENT|ORPHAN, dummy callbacks
 *   free R                  dlm_ls_unlock_wait of R's lock
 *   purge                   dlm_ls_purge(ls, 0, 0): every orphan of this node
 *   leave LS                dlm_release_lockspace(LS, ls, 1)
 *   quit                    exit without releasing anything (persistent locks become orphans)
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include <libdlm.h>

/* lvmlockd's value block: version, flags, the resource's version. */
struct val_blk {
	uint16_t version;
	uint16_t flags;
	uint32_t r_version;
};
#define VAL_BLK_VERSION 0x0101

struct resource {
	char name[DLM_RESNAME_MAXLEN + 1];
	struct dlm_lksb lksb;
	char lvb[DLM_LVB_LEN];
	int with_lvb;
	int mode;
	uint32_t r_version;
};

static struct resource resources[16];
static dlm_lshandle_t ls;

static struct resource *find(const char *name, int make)
{
	for (int i = 0; i < 16; i++)
		if (resources[i].name[0] && !strcmp(resources[i].name, name))
			return &resources[i];
	if (!make)
		return NULL;
	for (int i = 0; i < 16; i++)
		if (!resources[i].name[0]) {
			snprintf(resources[i].name, sizeof(resources[i].name), "%s", name);
			resources[i].lksb.sb_lvbptr = resources[i].lvb;
			return &resources[i];
		}
	return NULL;
}

static int mode_of(const char *text)
{
	return !strcmp(text, "EX") ? LKM_EXMODE : LKM_PRMODE;
}

static void lock(struct resource *r, int mode)
{
	uint32_t flags = LKF_CONVERT | LKF_NOQUEUE | LKF_PERSISTENT;
	if (r->with_lvb)
		flags |= LKF_VALBLK;
	int rv = dlm_ls_lock_wait(ls, mode, &r->lksb, flags, r->name, strlen(r->name), 0, NULL, NULL, NULL);
	if (rv == -1 && errno == EAGAIN) {
		printf("busy %s\n", r->name);
		return;
	}
	if (rv) {
		printf("error lock %s %d\n", r->name, errno);
		return;
	}
	r->mode = mode;
	struct val_blk vb = {0};
	if (r->with_lvb && !(r->lksb.sb_flags & DLM_SBF_VALNOTVALID))
		memcpy(&vb, r->lvb, sizeof(vb));
	r->r_version = vb.r_version;
	printf("granted %s %s version=%u vb=%#x\n", r->name, mode == LKM_EXMODE ? "EX" : "PR",
	       (unsigned)vb.r_version, (unsigned)vb.version);
}

static void unlock(struct resource *r)
{
	uint32_t flags = LKF_CONVERT;
	if (r->with_lvb && r->mode == LKM_EXMODE) {
		struct val_blk vb = { VAL_BLK_VERSION, 0, r->r_version };
		memset(r->lvb, 0, sizeof(r->lvb));
		memcpy(r->lvb, &vb, sizeof(vb));
		flags |= LKF_VALBLK;
	}
	int rv = dlm_ls_lock_wait(ls, LKM_NLMODE, &r->lksb, flags, r->name, strlen(r->name), 0, NULL, NULL, NULL);
	if (rv)
		printf("error unlock %s %d\n", r->name, errno);
	else {
		r->mode = LKM_NLMODE;
		printf("released %s\n", r->name);
	}
}

static void adopt(struct resource *r, int mode)
{
	uint32_t flags = LKF_PERSISTENT | LKF_ORPHAN;
	if (r->with_lvb)
		flags |= LKF_VALBLK;
	/* lvmlockd passes dummy callbacks: the kernel refuses NULL ones. */
	int rv = dlm_ls_lockx(ls, mode, &r->lksb, flags, r->name, strlen(r->name), 0,
			      (void *)1, (void *)1, (void *)1, NULL, NULL);
	if (rv == -1 && errno == ENOENT)
		printf("no-orphan %s\n", r->name);
	else if (rv == -1 && errno == EAGAIN)
		printf("orphan-in-other-mode %s\n", r->name);
	else if (rv)
		printf("error adopt %s %d\n", r->name, errno);
	else {
		r->mode = mode;
		printf("adopted %s lkid=%u status=%#x\n", r->name, r->lksb.sb_lkid, (unsigned)r->lksb.sb_status);
	}
}

int main(void)
{
	char line[256], cmd[32], a[128], b[32];
	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof(line), stdin)) {
		int n = sscanf(line, "%31s %127s %31s", cmd, a, b);
		if (n < 1)
			continue;
		if (!strcmp(cmd, "version")) {
			uint32_t maj, min, patch;
			if (dlm_kernel_version(&maj, &min, &patch))
				printf("error version %d\n", errno);
			else
				printf("version %u.%u.%u\n", maj, min, patch);
		} else if (!strcmp(cmd, "join")) {
			ls = dlm_new_lockspace(a, 0600, DLM_LSFL_NEWEXCL);
			if (!ls && errno == EEXIST)
				ls = dlm_open_lockspace(a);
			if (ls)
				printf("joined %s\n", a);
			else
				printf("error join %d\n", errno);
		} else if (!strcmp(cmd, "open")) {
			ls = dlm_open_lockspace(a);
			if (ls)
				printf("opened %s\n", a);
			else
				printf("error open %d\n", errno);
		} else if (!strcmp(cmd, "create")) {
			struct resource *r = find(a, 1);
			r->with_lvb = n > 2 && atoi(b);
			uint32_t flags = LKF_EXPEDITE | (r->with_lvb ? LKF_VALBLK : 0);
			int rv = dlm_ls_lock_wait(ls, LKM_NLMODE, &r->lksb, flags, r->name, strlen(r->name), 0, NULL, NULL, NULL);
			if (rv)
				printf("error create %s %d\n", a, errno);
			else
				printf("created %s lkid=%u\n", a, r->lksb.sb_lkid);
		} else if (!strcmp(cmd, "lock")) {
			lock(find(a, 1), mode_of(b));
		} else if (!strcmp(cmd, "version-of")) {
			find(a, 1)->r_version = (uint32_t)atoi(b);
			printf("version-of %s %s\n", a, b);
		} else if (!strcmp(cmd, "unlock")) {
			unlock(find(a, 1));
		} else if (!strcmp(cmd, "adopt")) {
			struct resource *r = find(a, 1);
			r->with_lvb = 1;
			adopt(r, mode_of(b));
		} else if (!strcmp(cmd, "free")) {
			struct resource *r = find(a, 1);
			int rv = dlm_ls_unlock_wait(ls, r->lksb.sb_lkid, 0, &r->lksb);
			if (rv)
				printf("error free %s %d\n", a, errno);
			else
				printf("freed %s status=%#x\n", a, (unsigned)r->lksb.sb_status);
		} else if (!strcmp(cmd, "purge")) {
			if (dlm_ls_purge(ls, 0, 0))
				printf("error purge %d\n", errno);
			else
				printf("purged\n");
		} else if (!strcmp(cmd, "leave")) {
			printf(dlm_release_lockspace(a, ls, 1) ? "error leave %d\n" : "left\n", errno);
			ls = NULL;
		} else if (!strcmp(cmd, "quit")) {
			return 0;
		} else {
			printf("error unknown-command %s\n", cmd);
		}
	}
	return 0;
}
