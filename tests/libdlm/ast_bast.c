/*
 * A threaded libdlm program with completion and blocking callbacks, as
 * programs on libdlm.so are written: dlm_ls_pthread_init, then
 * asynchronous dlm_ls_lock calls whose callbacks run on the library's
 * thread. Built against Debian's libdlm-dev header, linked -ldlm.
 *
 *   ast_bast LOCKSPACE holder   take EX on "shared" with a value block; on
 *                               the blocking callback, write the value block
 *                               and convert down to NL (from the callback, as
 *                               holders do), then unlock
 *   ast_bast LOCKSPACE waiter   take PR on "shared" with a value block; print
 *                               what it reads; convert to EX (waits for the
 *                               holder's NL), then unlock
 *
 * Each event is one line: "<what> <ns since the epoch> ...", so that a test
 * can order the events of programs on different nodes.
 */
#define _REENTRANT
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libdlm.h>

static dlm_lshandle_t ls;
static struct dlm_lksb lksb;
static char lvb[DLM_LVB_LEN];
static const char *role;
static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int step;

static unsigned long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

static void advance(void)
{
	pthread_mutex_lock(&mutex);
	step++;
	pthread_cond_signal(&cond);
	pthread_mutex_unlock(&mutex);
}

static void wait_step(int n)
{
	pthread_mutex_lock(&mutex);
	while (step < n)
		pthread_cond_wait(&cond, &mutex);
	pthread_mutex_unlock(&mutex);
}

static void ast(void *arg)
{
	const char *what = arg;
	printf("ast %llu %s status=%d lkid=%u lvb=%.*s\n", now_ns(), what, lksb.sb_status, lksb.sb_lkid,
	       DLM_LVB_LEN, lvb);
	advance();
}

static void bast(void *arg)
{
	(void)arg;
	printf("bast %llu\n", now_ns());
	/* Give it up from the callback: write the value block, down to NL. */
	memset(lvb, 0, sizeof(lvb));
	snprintf(lvb, sizeof(lvb), "from-holder-%d", (int)getpid() % 1000);
	int rv = dlm_ls_lock(ls, LKM_NLMODE, &lksb, LKF_CONVERT | LKF_VALBLK, "shared", 6, 0, ast, "down",
			     bast, NULL);
	if (rv)
		printf("error convert %d\n", errno);
}

static int request(int mode, uint32_t flags, const char *what)
{
	int rv = dlm_ls_lock(ls, mode, &lksb, flags | LKF_VALBLK, "shared", 6, 0, ast, (void *)what,
			     strcmp(role, "holder") ? NULL : bast, NULL);
	if (rv)
		printf("error request %s %d\n", what, errno);
	return rv;
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	role = argv[2];
	setvbuf(stdout, NULL, _IOLBF, 0);
	ls = dlm_open_lockspace(argv[1]);
	if (!ls) {
		printf("error open %d\n", errno);
		return 1;
	}
	if (dlm_ls_pthread_init(ls)) {
		printf("error pthread_init %d\n", errno);
		return 1;
	}
	lksb.sb_lvbptr = lvb;
	if (!strcmp(role, "holder")) {
		if (request(LKM_EXMODE, 0, "granted-ex"))
			return 1;
		wait_step(2); /* granted, then converted down from the blocking callback */
	} else {
		if (request(LKM_PRMODE, 0, "granted-pr"))
			return 1;
		wait_step(1);
		if (request(LKM_EXMODE, LKF_CONVERT, "converted-ex"))
			return 1;
		wait_step(2);
	}
	dlm_ls_unlock(ls, lksb.sb_lkid, 0, &lksb, "unlocked");
	wait_step(3);
	dlm_close_lockspace(ls);
	printf("done %llu\n", now_ns());
	return 0;
}
