/*
 * pam_ovirt_cred: single sign-on for the oVirt login screen.
 *
 * The host sends a "login" with a user name and a password to the guest
 * agent, which keeps them behind a one-time token and broadcasts the token on
 * the D-Bus system bus (org.ovirt.vdsm.Credentials.UserAuthenticated).  The
 * login screen then runs the PAM service "gdm-ovirtcred" and answers this
 * module's hidden "Token?" question with the token.  The module trades the
 * token for the credentials over the agent's root-only Unix socket and puts
 * them into PAM_USER and PAM_AUTHTOK; the modules stacked after it (pam_unix,
 * pam_sss with use_first_pass) do the real password check.
 *
 * Names the login screens know stay as they were: the module file
 * pam_ovirt_cred.so, the service gdm-ovirtcred, the ECHO_OFF "Token?" prompt,
 * and the reply's wire format:
 *
 *     uint32 big-endian length of the user name | user name | password | NUL
 *
 * What is hardened: the socket is a file in a root-only directory (no
 * abstract name anyone could squat), the server must be root (SO_PEERCRED),
 * the token is sent followed by a half-close so the server reads exactly it,
 * the reply is read whole within the original's 3 second limit and checked
 * field by field, and every buffer that held the token or the password is
 * wiped before it is freed.
 *
 * Module arguments:
 *     socket=PATH     the agent's credentials socket (default OVIRT_CRED_SOCKET)
 *     debug           log each step (never the token or the password)
 *     server_uid=N    test builds only (OVIRT_CRED_TEST_KNOBS): also accept a
 *                     server running as uid N, so the tests can run a server
 *                     that is not root.  The installed module refuses this
 *                     argument and fails closed.
 */

#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>
#include <pwd.h>

#define PAM_SM_AUTH
#include <security/pam_modules.h>
#include <security/pam_ext.h>
#include <security/pam_modutil.h>

/* Built with -fvisibility=hidden: only the PAM entry points are exported. */
#define MODULE_EXPORT __attribute__((visibility("default")))

#ifndef OVIRT_CRED_SOCKET
#define OVIRT_CRED_SOCKET "/run/qga/sso/cred.sock"
#endif

/* What the greeters look for: gnome-shell answers any hidden question of
 * the service with the token, the older plugins only this exact prompt. */
#define TOKEN_PROMPT "Token?"

/* The original waits 3 seconds for the agent's answer. */
#define REPLY_TIMEOUT_MS 3000

/* Tokens are short printable strings; anything longer is not one. */
#define MAX_TOKEN_LEN 256

/* The agent caps user name plus password well below this. */
#define MAX_REPLY_LEN 8192

#define LENGTH_PREFIX 4

struct options {
    const char *socket_path;
    int debug;
    int test_uid_set;
    uid_t test_uid;
};

struct credentials {
    char *user;
    char *password;
};

static void wipe_and_free(char *buffer, size_t size)
{
    if (buffer != NULL) {
        explicit_bzero(buffer, size);
        free(buffer);
    }
}

static void wipe_and_free_string(char *text)
{
    if (text != NULL)
        wipe_and_free(text, strlen(text));
}

static void credentials_clear(struct credentials *credentials)
{
    wipe_and_free_string(credentials->password);
    free(credentials->user);
    credentials->user = NULL;
    credentials->password = NULL;
}

#ifdef OVIRT_CRED_TEST_KNOBS
static int parse_uid(const char *text, uid_t *uid)
{
    char *end = NULL;
    unsigned long value;

    errno = 0;
    value = strtoul(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value >= (unsigned long)(uid_t)-1)
        return -1;
    *uid = (uid_t)value;
    return 0;
}
#endif

static int parse_options(pam_handle_t *pamh, int argc, const char **argv, struct options *options)
{
    int i;

    options->socket_path = OVIRT_CRED_SOCKET;
    options->debug = 0;
    options->test_uid_set = 0;
    options->test_uid = 0;

    for (i = 0; i < argc; i++) {
        if (strncmp(argv[i], "socket=", 7) == 0 && argv[i][7] == '/') {
            options->socket_path = argv[i] + 7;
        } else if (strcmp(argv[i], "debug") == 0) {
            options->debug = 1;
        } else if (strncmp(argv[i], "server_uid=", 11) == 0) {
#ifdef OVIRT_CRED_TEST_KNOBS
            if (parse_uid(argv[i] + 11, &options->test_uid) != 0) {
                pam_syslog(pamh, LOG_ERR, "bad module argument: %s", argv[i]);
                return -1;
            }
            options->test_uid_set = 1;
#else
            pam_syslog(pamh, LOG_ERR,
                       "server_uid= is accepted only by a test build of this module");
            return -1;
#endif
        } else {
            pam_syslog(pamh, LOG_ERR, "unknown module argument: %s", argv[i]);
            return -1;
        }
    }
    return 0;
}

/* Milliseconds left until the deadline, 0 once it has passed. */
static int remaining_ms(const struct timespec *deadline)
{
    struct timespec now;
    long long left;

    clock_gettime(CLOCK_MONOTONIC, &now);
    left = (long long)(deadline->tv_sec - now.tv_sec) * 1000
        + (deadline->tv_nsec - now.tv_nsec) / 1000000;
    if (left <= 0)
        return 0;
    return left > INT_MAX ? INT_MAX : (int)left;
}

static int connect_to_agent(pam_handle_t *pamh, const struct options *options)
{
    struct sockaddr_un address;
    size_t path_len = strlen(options->socket_path);
    int fd;

    if (path_len >= sizeof(address.sun_path)) {
        pam_syslog(pamh, LOG_ERR, "socket path too long: %s", options->socket_path);
        return -1;
    }
    memset(&address, 0, sizeof(address));
    address.sun_family = AF_UNIX;
    memcpy(address.sun_path, options->socket_path, path_len + 1);

    /* Non-blocking: a full listen backlog fails at once (EAGAIN) instead of
     * blocking the login screen; the rest of the exchange polls with a deadline. */
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        pam_syslog(pamh, LOG_ERR, "socket: %m");
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&address, sizeof(address)) != 0) {
        /* No offer is pending (the agent binds only while one is), or the
         * agent is not running: the usual way a stale token ends. */
        pam_syslog(pamh, LOG_NOTICE, "cannot reach the agent at %s: %m", options->socket_path);
        close(fd);
        return -1;
    }
    return fd;
}

/* The server must be root (or the test build's allowed uid): anyone else
 * could hand us credentials of their choosing. */
static int check_server(pam_handle_t *pamh, int fd, const struct options *options)
{
    struct ucred peer;
    socklen_t size = sizeof(peer);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &size) != 0 || size != sizeof(peer)) {
        pam_syslog(pamh, LOG_ERR, "cannot read the server's credentials: %m");
        return -1;
    }
    if (peer.uid == 0 || (options->test_uid_set && peer.uid == options->test_uid))
        return 0;
    pam_syslog(pamh, LOG_ERR, "refusing a credentials server running as uid %lu (pid %ld)",
               (unsigned long)peer.uid, (long)peer.pid);
    return -1;
}

static int send_token(pam_handle_t *pamh, int fd, const char *token, const struct timespec *deadline)
{
    size_t length = strlen(token);
    size_t sent = 0;

    while (sent < length) {
        struct pollfd ready = { .fd = fd, .events = POLLOUT };
        ssize_t count;
        int timeout = remaining_ms(deadline);

        if (timeout == 0 || poll(&ready, 1, timeout) == 0) {
            pam_syslog(pamh, LOG_ERR, "timed out sending the token");
            return -1;
        }
        count = send(fd, token + sent, length - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (count < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            pam_syslog(pamh, LOG_ERR, "send: %m");
            return -1;
        }
        sent += (size_t)count;
    }
    /* The half-close tells the server the token is complete. */
    if (shutdown(fd, SHUT_WR) != 0) {
        pam_syslog(pamh, LOG_ERR, "shutdown: %m");
        return -1;
    }
    return 0;
}

/* Reads until the server closes; returns the length, or -1. */
static ssize_t receive_reply(pam_handle_t *pamh, int fd, char *reply, size_t capacity,
                             const struct timespec *deadline)
{
    size_t received = 0;

    for (;;) {
        struct pollfd ready = { .fd = fd, .events = POLLIN };
        ssize_t count;
        int timeout = remaining_ms(deadline);
        int polled;

        if (timeout == 0) {
            pam_syslog(pamh, LOG_ERR, "no answer from the agent within %d ms", REPLY_TIMEOUT_MS);
            return -1;
        }
        polled = poll(&ready, 1, timeout);
        if (polled < 0 && errno == EINTR)
            continue;
        if (polled < 0) {
            pam_syslog(pamh, LOG_ERR, "poll: %m");
            return -1;
        }
        if (polled == 0)
            continue;  /* the deadline check above ends it */
        /* One byte more than allowed tells an overlong reply from a full one. */
        count = recv(fd, reply + received, capacity - received, MSG_DONTWAIT);
        if (count < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            pam_syslog(pamh, LOG_ERR, "recv: %m");
            return -1;
        }
        if (count == 0)
            return (ssize_t)received;
        received += (size_t)count;
        if (received == capacity) {
            pam_syslog(pamh, LOG_ERR, "the agent's answer is longer than %d bytes", MAX_REPLY_LEN);
            return -1;
        }
    }
}

/*
 * Splits "length | user | password | NUL".  An empty answer is the agent's
 * refusal (wrong, replayed or expired token).
 */
static int parse_reply(pam_handle_t *pamh, const char *reply, size_t length,
                       struct credentials *credentials)
{
    uint32_t user_len_be;
    size_t user_len;
    size_t password_len;

    if (length == 0) {
        pam_syslog(pamh, LOG_NOTICE, "the agent refused the token");
        return -1;
    }
    if (length < LENGTH_PREFIX + 2 || reply[length - 1] != '\0') {
        pam_syslog(pamh, LOG_ERR, "malformed answer from the agent");
        return -1;
    }
    memcpy(&user_len_be, reply, LENGTH_PREFIX);
    user_len = ntohl(user_len_be);
    if (user_len == 0 || user_len > length - LENGTH_PREFIX - 1) {
        pam_syslog(pamh, LOG_ERR, "malformed answer from the agent");
        return -1;
    }
    password_len = length - LENGTH_PREFIX - user_len - 1;
    if (memchr(reply + LENGTH_PREFIX, '\0', user_len) != NULL
        || memchr(reply + LENGTH_PREFIX + user_len, '\0', password_len) != NULL) {
        pam_syslog(pamh, LOG_ERR, "malformed answer from the agent");
        return -1;
    }
    credentials->user = strndup(reply + LENGTH_PREFIX, user_len);
    credentials->password = strndup(reply + LENGTH_PREFIX + user_len, password_len);
    if (credentials->user == NULL || credentials->password == NULL) {
        pam_syslog(pamh, LOG_CRIT, "out of memory");
        credentials_clear(credentials);
        return -1;
    }
    return 0;
}

/*
 * "user@domain" of a user this machine knows (local or NIS) becomes "user";
 * anything else keeps its domain for SSSD or winbind.
 */
static void drop_local_domain(pam_handle_t *pamh, struct credentials *credentials)
{
    char *at = strchr(credentials->user, '@');

    if (at == NULL || at == credentials->user)
        return;
    *at = '\0';
    if (pam_modutil_getpwnam(pamh, credentials->user) == NULL)
        *at = '@';
}

static int fetch_credentials(pam_handle_t *pamh, const struct options *options,
                             const char *token, struct credentials *credentials)
{
    struct timespec deadline;
    char *reply;
    ssize_t length;
    int fd;
    int result = -1;

    reply = calloc(1, MAX_REPLY_LEN);
    if (reply == NULL) {
        pam_syslog(pamh, LOG_CRIT, "out of memory");
        return -1;
    }
    fd = connect_to_agent(pamh, options);
    if (fd >= 0 && check_server(pamh, fd, options) == 0) {
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += REPLY_TIMEOUT_MS / 1000;
        if (send_token(pamh, fd, token, &deadline) == 0) {
            length = receive_reply(pamh, fd, reply, MAX_REPLY_LEN, &deadline);
            if (length >= 0)
                result = parse_reply(pamh, reply, (size_t)length, credentials);
        }
    }
    if (fd >= 0)
        close(fd);
    wipe_and_free(reply, MAX_REPLY_LEN);
    return result;
}

static int ask_token(pam_handle_t *pamh, char **token)
{
    int status;

    *token = NULL;
    status = pam_prompt(pamh, PAM_PROMPT_ECHO_OFF, token, "%s", TOKEN_PROMPT);
    if (status != PAM_SUCCESS || *token == NULL) {
        pam_syslog(pamh, LOG_NOTICE, "no token from the conversation");
        return -1;
    }
    if ((*token)[0] == '\0' || strlen(*token) > MAX_TOKEN_LEN) {
        pam_syslog(pamh, LOG_NOTICE, "the answer to %s is not a token", TOKEN_PROMPT);
        return -1;
    }
    return 0;
}

/* An unlock flow names its user up front: never unlock someone else's session. */
static int check_requested_user(pam_handle_t *pamh, const char *user)
{
    const void *item = NULL;

    if (pam_get_item(pamh, PAM_USER, &item) != PAM_SUCCESS || item == NULL)
        return 0;
    if (((const char *)item)[0] == '\0' || strcmp((const char *)item, user) == 0)
        return 0;
    pam_syslog(pamh, LOG_WARNING,
               "credentials are for %s but this conversation is for %s",
               user, (const char *)item);
    return -1;
}

MODULE_EXPORT PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    struct options options;
    struct credentials credentials = { NULL, NULL };
    char *token = NULL;
    int status;

    (void)flags;
    if (parse_options(pamh, argc, argv, &options) != 0)
        return PAM_SERVICE_ERR;

    if (ask_token(pamh, &token) != 0) {
        status = PAM_USER_UNKNOWN;
        goto out;
    }
    if (fetch_credentials(pamh, &options, token, &credentials) != 0) {
        status = PAM_USER_UNKNOWN;
        goto out;
    }
    drop_local_domain(pamh, &credentials);
    if (check_requested_user(pamh, credentials.user) != 0) {
        status = PAM_CRED_UNAVAIL;
        goto out;
    }
    if (pam_set_item(pamh, PAM_USER, credentials.user) != PAM_SUCCESS
        || pam_set_item(pamh, PAM_AUTHTOK, credentials.password) != PAM_SUCCESS) {
        pam_syslog(pamh, LOG_ERR, "cannot set the user or the password");
        status = PAM_USER_UNKNOWN;
        goto out;
    }
    if (options.debug)
        pam_syslog(pamh, LOG_DEBUG, "credentials of %s handed on", credentials.user);
    status = PAM_SUCCESS;

out:
    wipe_and_free_string(token);
    credentials_clear(&credentials);
    return status;
}

MODULE_EXPORT PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh;
    (void)flags;
    (void)argc;
    (void)argv;
    return PAM_SUCCESS;
}
