"""Warren: a gateway that holds long-lived device connections and routes their messages through RabbitMQ."""
