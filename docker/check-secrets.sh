#!/bin/sh
# Refuses a missing, placeholder or short secret. compose.yaml runs this as the one-shot
# service check-secrets, which every other service waits for; `make secrets` writes values
# that pass. Usage: sh check-secrets.sh (the secrets in the environment).
status=0
for name in POSTGRES_PASSWORD AIRFLOW_DB_PASSWORD MLFLOW_DB_PASSWORD REDIS_PASSWORD \
        MINIO_ROOT_USER MINIO_ROOT_PASSWORD MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY \
        AIRFLOW_ADMIN_PASSWORD AIRFLOW_FERNET_KEY AIRFLOW_JWT_SECRET AIRFLOW_API_SECRET_KEY; do
    value="$(printenv "$name")"
    case "$value" in
        *change-me*) echo "check-secrets: $name is still the placeholder; run 'make secrets'" >&2
                     status=1; continue ;;
    esac
    if [ "${#value}" -lt 16 ]; then
        echo "check-secrets: $name is missing or shorter than 16 characters" >&2
        status=1
    fi
done
# A Fernet key is 32 bytes in urlsafe base64: 44 characters ending in '='.
if [ "${#AIRFLOW_FERNET_KEY}" -ne 44 ] || [ "${AIRFLOW_FERNET_KEY%=}" = "$AIRFLOW_FERNET_KEY" ]; then
    echo "check-secrets: AIRFLOW_FERNET_KEY is not a Fernet key (make secrets writes one)" >&2
    status=1
fi
[ "$status" -eq 0 ] || echo "check-secrets: refusing to start the stack (see docker/README.md)" >&2
[ "$status" -ne 0 ] || echo "check-secrets: ok"
exit "$status"
