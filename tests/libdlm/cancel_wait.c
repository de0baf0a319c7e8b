/*
 * A waiting lock call cancelled from another thread, as threaded libdlm
 * programs give up on a lock: the main thread waits in dlm_ls_lock_wait for
 * a resource another node holds; a second thread cancels the request
 * (dlm_ls_unlock with LKF_CANCEL); the waiting call returns with ECANCEL in
 * the status block. `cancel_wait LOCKSPACE RESOURCE`. Linked -ldlm.
 */
#define _REENTRANT
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include <libdlm.h>

static dlm_lshandle_t ls;
static struct dlm_lksb lksb;

static void *canceller(void *arg)
{
	(void)arg;
	usleep(300 * 1000);
	int rv = dlm_ls_unlock(ls, lksb.sb_lkid, LKF_CANCEL, &lksb, NULL);
	printf("cancel sent rv=%d\n", rv);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	ls = dlm_open_lockspace(argv[1]);
	if (!ls) {
		printf("error open %d\n", errno);
		return 1;
	}
	pthread_t thread;
	pthread_create(&thread, NULL, canceller, NULL);
	int rv = dlm_ls_lock_wait(ls, LKM_EXMODE, &lksb, 0, argv[2], strlen(argv[2]), 0, NULL, NULL, NULL);
	printf("wait returned rv=%d status=%d\n", rv, lksb.sb_status);
	pthread_join(thread, NULL);
	dlm_close_lockspace(ls);
	return 0;
}
