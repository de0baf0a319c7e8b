/*
 * Lock+unlock pairs through dlm's libdlm for a while, as a libdlm program
 * takes them (dlm_ls_lock_wait, dlm_ls_unlock_wait, one resource, EX):
 * `pairs LOCKSPACE SECONDS` prints how many it did. For the clients
 * benchmark (tests/benches/clients.rs). Linked -ldlm_lt.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <libdlm.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	dlm_lshandle_t ls = dlm_open_lockspace(argv[1]);
	if (!ls) {
		printf("error open %d\n", errno);
		return 1;
	}
	double until = now() + atof(argv[2]);
	unsigned long pairs = 0;
	struct dlm_lksb lksb;
	while (now() < until) {
		if (dlm_ls_lock_wait(ls, LKM_EXMODE, &lksb, 0, "pairs", 5, 0, NULL, NULL, NULL) ||
		    dlm_ls_unlock_wait(ls, lksb.sb_lkid, 0, &lksb)) {
			printf("error pair %d\n", errno);
			return 1;
		}
		pairs++;
	}
	printf("%lu\n", pairs);
	dlm_close_lockspace(ls);
	return 0;
}
